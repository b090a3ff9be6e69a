"""DPM-Solver++ samplers: parity with diffusers' DPMSolverMultistepScheduler on a tiny UNet, and the math
on analytic models (exact solutions, convergence orders, sample distributions)."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from sdtorch.configs import TINY_SD1
from sdtorch.errors import InvalidInputError
from sdtorch.models.unet import UNet
from sdtorch.sampling import dpmpp
from sdtorch.sampling.denoiser import Denoiser
from sdtorch.sampling.schedules import DiscreteSchedule, SamplingSchedule, karras_sigmas

SAMPLERS = {
    "2m": dpmpp.sample_dpmpp_2m,
    "2m_sde": dpmpp.sample_dpmpp_2m_sde,
    "3m_sde": dpmpp.sample_dpmpp_3m_sde,
    "2s_a": dpmpp.sample_dpmpp_2s_ancestral,
    "sde": dpmpp.sample_dpmpp_sde,
}
STOCHASTIC = ["2m_sde", "3m_sde", "2s_a", "sde"]
# (sdtorch schedule kind, diffusers timestep_spacing): every spacing, plus Karras and exponential sigmas
# (those span the model's whole sigma range in diffusers whatever the spacing).
GRIDS = [("automatic", "leading"), ("automatic", "linspace"), ("automatic", "trailing"),
         ("karras", "linspace"), ("exponential", "linspace")]
SIGMA_MAX, SIGMA_MIN = 14.614641, 0.0291672  # SD1.x


# ---------------------------------------------------------------- parity with diffusers (tiny UNet)

def reference_scheduler(steps, kind, spacing, prediction_type, algorithm_type):
    """DPMSolverMultistepScheduler configured to be k-diffusion's (A1111's) DPM++ 2M / 2M SDE.

    final_sigmas_type="zero" is what makes them agree: it ends at sigma 0 and forces the last step to be
    first order (x = denoised), as k-diffusion does. With it, lower_order_final and euler_at_final change
    nothing for solver_order 2 (both only touch that last step; see the test below); "sigma_min" instead
    ends at the smallest training sigma with a second-order step, which k-diffusion never does.
    """
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, prediction_type=prediction_type, algorithm_type=algorithm_type, solver_order=2,
        solver_type="midpoint", thresholding=False, lower_order_final=True, euler_at_final=False,
        final_sigmas_type="zero", use_karras_sigmas=kind == "karras", use_exponential_sigmas=kind == "exponential",
        use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, lambda_min_clipped=-float("inf"),
        variance_type=None, timestep_spacing=spacing, steps_offset=1, rescale_betas_zero_snr=False,
    )
    scheduler.set_timesteps(steps)
    return scheduler


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = UNet(TINY_SD1.unet).eval()
    ctx = torch.randn(1, 7, 128)
    noise = torch.randn(1, 4, 8, 8)
    return unet, ctx, noise


def run_both(tiny, steps, kind, spacing, prediction_type, sampler, algorithm_type, seed=None, **scheduler_overrides):
    """(ours, diffusers') final latents from the same starting point and, for SDE, the same generator seed."""
    unet, ctx, noise = tiny
    ref = reference_scheduler(steps, kind, spacing, prediction_type, algorithm_type)
    ref.register_to_config(**scheduler_overrides)
    schedule = DiscreteSchedule()
    grid = dpmpp.multistep_schedule(schedule, steps, kind, spacing)
    if kind == "exponential":  # see test_multistep_schedule_matches_diffusers: give the UNet diffusers' timesteps
        grid = SamplingSchedule(grid.sigmas, ref.timesteps.double())
    denoiser = Denoiser(unet, schedule, prediction_type)
    denoiser.use_timesteps_of(grid)
    x = noise * grid.sigmas[0].float()  # sigma space
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        ours = sampler(lambda x, sigma: denoiser(x, sigma, ctx), x, grid.sigmas, generator=gen)
        ours = ours / (1 + grid.sigmas[-1].float() ** 2).sqrt()

        # diffusers starts at noise * init_noise_sigma (= noise); we start it from the same point as ours,
        # the variance-preserving x / sqrt(1 + sigma_0^2): what is compared is the solver.
        latents = x / (1 + grid.sigmas[0].float() ** 2).sqrt()
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        for t in ref.timesteps:
            out = unet(ref.scale_model_input(latents, t), t.reshape(1), ctx)
            latents = ref.step(out, t, latents, generator=gen).prev_sample
    return ours, latents


def assert_close_relative(ours, ref, rel=1e-4):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} * max|ref| = {rel * scale:.3e}"


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind,spacing", GRIDS)
def test_dpmpp_2m_matches_diffusers(tiny, steps, kind, spacing, prediction_type):
    ours, ref = run_both(tiny, steps, kind, spacing, prediction_type, dpmpp.sample_dpmpp_2m, "dpmsolver++")
    assert_close_relative(ours, ref)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind,spacing", GRIDS)
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_generator(tiny, steps, kind, spacing, prediction_type):
    # Exact, noise included: diffusers draws randn_tensor(shape, generator) (one torch.randn on the CPU
    # generator) at every step; ours draws the same call at every step but the last, whose noise diffusers
    # multiplies by sigma_next = 0. So both consume the generator identically where it matters.
    ours, ref = run_both(tiny, steps, kind, spacing, prediction_type, dpmpp.sample_dpmpp_2m_sde,
                         "sde-dpmsolver++", seed=1234)
    assert_close_relative(ours, ref)


@pytest.mark.parametrize("lower_order_final,euler_at_final", [(False, False), (False, True), (True, True)])
def test_final_step_flags_do_not_matter_with_zero_final_sigma(tiny, lower_order_final, euler_at_final):
    ours, ref = run_both(tiny, 25, "karras", "linspace", "epsilon", dpmpp.sample_dpmpp_2m, "dpmsolver++",
                         lower_order_final=lower_order_final, euler_at_final=euler_at_final)
    assert_close_relative(ours, ref)


def test_a_different_seed_gives_a_different_sde_result(tiny):
    """The exact SDE match above is not an accident of tiny noise: the noise moves the result."""
    a, _ = run_both(tiny, 10, "karras", "linspace", "epsilon", dpmpp.sample_dpmpp_2m_sde, "sde-dpmsolver++", seed=1)
    b, _ = run_both(tiny, 10, "karras", "linspace", "epsilon", dpmpp.sample_dpmpp_2m_sde, "sde-dpmsolver++", seed=2)
    assert (a - b).abs().max() > 0.05 * a.abs().max()


@pytest.mark.parametrize("steps", [1, 10, 25, 999])
@pytest.mark.parametrize("kind,spacing", GRIDS)
def test_multistep_schedule_matches_diffusers(steps, kind, spacing):
    ref = reference_scheduler(steps, kind, spacing, "epsilon", "dpmsolver++")
    ours = dpmpp.multistep_schedule(DiscreteSchedule(), steps, kind, spacing)
    # diffusers truncates the fractional timesteps of exponential sigmas to integers after float32 arithmetic:
    # at sigma_max, t = 999 - 1e-5 becomes 998 there, where float64 gives exactly 999.
    atol = 1.0 if kind == "exponential" else 0.0
    torch.testing.assert_close(ours.timesteps, ref.timesteps.double(), rtol=0, atol=atol)
    torch.testing.assert_close(ours.sigmas.float(), ref.sigmas, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- analytic models

class GaussianData:
    """Data x0 ~ N(mu, s^2), independently per dimension (last axis). Then, exactly,
    D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE carries x from
    sigma_0 to sigma as x(sigma) = mu + (x(sigma_0) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2))."""

    def __init__(self):
        self.mu = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
        self.s = torch.tensor([0.5, 1.0, 0.2, 2.0], dtype=torch.float64)

    def __call__(self, x, sigma):
        var = self.s**2
        return self.mu + var / (var + sigma**2) * (x - self.mu)

    def ode(self, x, sigma_from, sigma_to):
        var = self.s**2
        return self.mu + (x - self.mu) * ((var + sigma_to**2) / (var + sigma_from**2)).sqrt()

    def marginal(self, n, sigma, generator):
        """n samples of x = x0 + sigma * eps: N(mu, s^2 + sigma^2) per dimension."""
        noise = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        return self.mu + (self.s**2 + sigma**2).sqrt() * noise


def karras_without_zero(steps):
    """(steps + 1,) Karras sigmas from sigma_max to sigma_min, without the final 0: the ODE's exact
    solution is compared at sigma_min (a last step to 0 is first order by design)."""
    return karras_sigmas(steps + 1, SIGMA_MIN, SIGMA_MAX)[:-1]


def global_error(sampler, steps, eta):
    model = GaussianData()
    sigmas = karras_without_zero(steps)
    x = model.marginal(256, sigmas[0], torch.Generator().manual_seed(0))
    out = sampler(model, x, sigmas, eta=eta, generator=torch.Generator().manual_seed(1))
    return (out - model.ode(x, sigmas[0], sigmas[-1])).abs().max().item()


def observed_orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize("name", ["2m", "2m_sde", "3m_sde", "2s_a", "sde"])
def test_eta_0_converges_to_the_exact_ode_solution(name):
    """At eta = 0 every sampler is a deterministic ODE solver: error against the closed-form solution
    falls with the number of steps; second order (within 0.3) for all but 3M, third-order 3M beats 2M."""
    errors = [global_error(SAMPLERS[name], n, 0.0) for n in (16, 32, 64)]
    orders = observed_orders(errors)
    assert errors[-1] < 5e-3, errors
    if name == "3m_sde":
        errors_2m = [global_error(dpmpp.sample_dpmpp_2m, n, 0.0) for n in (16, 32, 64)]
        assert all(e3 < e2 / 2 for e3, e2 in zip(errors, errors_2m)), (errors, errors_2m)
        assert all(o > 2.5 for o in orders), orders  # third order until the first-order start-up step dominates
    else:
        assert all(abs(o - 2) < 0.3 for o in orders), orders


def lambda_only_denoiser(a=0.7):
    """A denoiser that ignores x: D = f(lambda) = exp(a lambda) + lambda^2, lambda = -log sigma. The earlier
    estimates a multistep method keeps are then exact whatever its x, so one step's local error can be
    measured through the public API. Returns (model, step) with step(x, sigma, sigma_next, eta) the exact
    mean of one (SDE-)step: e^(-eta h) (sigma_next / sigma) x + integral_0^h c e^(c (u - h)) f(lambda + u) du,
    c = 1 + eta."""

    def f(lam):
        return math.exp(a * lam) + lam**2

    def model(x, sigma):
        return torch.full_like(x, f(-math.log(float(sigma))))

    def step(x, sigma, sigma_next, eta):
        lam, h, c = -math.log(sigma), math.log(sigma / sigma_next), 1 + eta

        def g(u):  # antiderivative of c e^(c (u - h)) (lam + u)^2
            return math.exp(c * (u - h)) * ((lam + u) ** 2 - 2 * (lam + u) / c + 2 / c**2)

        exp_part = c * math.exp(a * lam) * (math.exp(a * h) - math.exp(-c * h)) / (c + a)
        return math.exp(-eta * h) * (sigma_next / sigma) * x + exp_part + g(h) - g(0)

    return model, step


@pytest.mark.parametrize("name,eta,local_order", [
    ("2m", 0.0, 3), ("2m_sde", 0.0, 3), ("2m_sde", 1.0, 3), ("3m_sde", 0.0, 4), ("3m_sde", 1.0, 4),
])
def test_multistep_local_error_order(name, eta, local_order):
    """The last of `history + 1` steps on a uniform lambda grid: local error O(h^(p+1)) for a p-th order
    method. (k-diffusion's DPM++ 3M weighs the second difference by -phi_3 and measures 3 here.)"""
    model, exact_step = lambda_only_denoiser()
    sampler = SAMPLERS[name]
    history = 2 if name == "3m_sde" else 1
    errors = []
    for h in (0.2, 0.1, 0.05):
        sigmas = torch.tensor([math.exp(1.0 - k * h) for k in range(history + 2)], dtype=torch.float64)
        x0 = torch.tensor([0.3], dtype=torch.float64)
        before = sampler(model, x0, sigmas[:-1], eta=eta, s_noise=0.0)  # x at sigmas[-2]
        after = sampler(model, x0, sigmas, eta=eta, s_noise=0.0)
        errors.append(abs(after.item() - exact_step(before.item(), sigmas[-2].item(), sigmas[-1].item(), eta)))
    assert all(abs(o - local_order) < 0.3 for o in observed_orders(errors)), errors


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samples_have_the_data_distribution(name, eta):
    """With noise on, the final samples of many chains (one batch, 60 Karras steps) have the data
    distribution: per dimension, mean and std within 5 standard errors, and the Kolmogorov-Smirnov
    distance of the standardised samples below its alpha = 0.001 critical value.

    The target std is that of the last step's output: a perfect sample at sigma_min, denoised
    (x = D), has std s^2 / sqrt(s^2 + sigma_min^2), 1% below s for s = 0.2 (k-diffusion's design)."""
    model, n = GaussianData(), 50000
    sigmas = karras_sigmas(60, SIGMA_MIN, SIGMA_MAX)
    z, target = standardised_samples(SAMPLERS[name], model, n, sigmas, eta=eta)
    assert z.mean(0).abs().max() < 5 / math.sqrt(n), z.mean(0)
    assert (z.std(0) - target).abs().max() < 5 / math.sqrt(2 * n), (z.std(0), target)
    assert ks_distance_to_normal((z / target).flatten()) < 1.95 / math.sqrt(z.numel())


def test_distribution_check_catches_missing_noise():
    """The check above has power: the same SDE sampler with s_noise = 0 narrows the spread and fails it."""
    model = GaussianData()
    sigmas = karras_sigmas(60, SIGMA_MIN, SIGMA_MAX)
    z, target = standardised_samples(dpmpp.sample_dpmpp_2m_sde, model, 50000, sigmas, s_noise=0.0)
    assert (z.std(0) - target).abs().max() > 0.1


def standardised_samples(sampler, model, n, sigmas, **kwargs):
    """(z, target std of z): z = (x - mu) / s for n chains started from the exact marginal at sigmas[0]."""
    x = model.marginal(n, sigmas[0], torch.Generator().manual_seed(0))
    out = sampler(model, x, sigmas, generator=torch.Generator().manual_seed(1), **kwargs)
    target = model.s / (model.s**2 + sigmas[-2] ** 2).sqrt()
    return (out - model.mu) / model.s, target


def ks_distance_to_normal(z):
    z, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    i = torch.arange(1, len(z) + 1, dtype=z.dtype)
    return max((i / len(z) - cdf).abs().max().item(), (cdf - (i - 1) / len(z)).abs().max().item())


def test_dpmpp_sde_substep_noise_is_a_brownian_increment_pair():
    """The two draws of a DPM++ SDE step are normalised increments of one Brownian motion over
    [sigma_mid, sigma] and [sigma_next, sigma]: unit variance, correlation sqrt((sigma - mid) / (sigma - next))."""
    sigma, mid, nxt = 2.0, 2.0**0.5, 1.0
    x = torch.zeros(200000, dtype=torch.float64)
    z_mid, z_next = dpmpp._brownian_increments(x, torch.Generator().manual_seed(0), sigma, mid, nxt)
    stats = torch.corrcoef(torch.stack([z_mid, z_next]))
    tol = 5 / math.sqrt(len(x))
    assert abs(z_mid.var().item() - 1) < 2 * tol and abs(z_next.var().item() - 1) < 2 * tol
    assert abs(stats[0, 1].item() - math.sqrt((sigma - mid) / (sigma - nxt))) < tol


# ---------------------------------------------------------------- the common contract

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_contract(name):
    """Ends on the last denoised estimate at sigma 0, reports every step once, leaves its input alone,
    is reproducible from a seeded generator; eta = 0 is deterministic."""
    model = GaussianData()
    sigmas = karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    x = model.marginal(16, sigmas[0], torch.Generator().manual_seed(0))
    x_before = x.clone()
    steps = []
    out = SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(1), callback=steps.append)
    assert torch.equal(x, x_before)
    assert [(s.index, s.total) for s in steps] == [(i, 8) for i in range(8)]
    assert [s.sigma for s in steps] == pytest.approx(sigmas[:-1].tolist())
    assert torch.equal(out, steps[-1].denoised)
    again = SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    if name in STOCHASTIC:
        other = SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(out, other)
        quiet = [SAMPLERS[name](model, x, sigmas, eta=0.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        assert torch.equal(*quiet)
        with pytest.raises(InvalidInputError, match="eta"):
            SAMPLERS[name](model, x, sigmas, eta=-0.1)


def test_2m_sde_at_eta_0_is_2m():
    model = GaussianData()
    sigmas = karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
    x = model.marginal(16, sigmas[0], torch.Generator().manual_seed(0))
    torch.testing.assert_close(dpmpp.sample_dpmpp_2m_sde(model, x, sigmas, eta=0.0),
                               dpmpp.sample_dpmpp_2m(model, x, sigmas), rtol=1e-12, atol=1e-12)


def test_float32_input_stays_float32():
    model = GaussianData()
    sigmas = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX)
    x = model.marginal(4, sigmas[0], torch.Generator().manual_seed(0)).float()
    f32 = lambda x, sigma: model(x.double(), sigma).float()  # noqa: E731
    for name, sampler in SAMPLERS.items():
        assert sampler(f32, x, sigmas, generator=torch.Generator().manual_seed(0)).dtype == torch.float32, name


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde clamps a query a float32 rounding past its span
@pytest.mark.parametrize("sampler", ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_seeded_sde_noise_is_a1111s_brownian_trees(sampler):
    """Seeded images draw the SDE noise A1111 does: k-diffusion's BrownianTreeNoiseSampler, one torchsde tree per
    seed over the whole sampling's [sigma_min, sigma_max], queried (sigma, sigma_next) and normalised. With a model
    that predicts x0 = 0, every step is x' = e^-2h x + sigma' sqrt(1 - e^-2h) z: the z are read back and checked
    against trees built here as k-diffusion builds them."""
    import torchsde

    from sdtorch.sampling.common import SeededNoise

    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0], dtype=torch.float64)
    seeds, shape = [7, 8], (2, 4, 3, 3)
    noise = SeededNoise(seeds)
    noise.span = (0.3, 14.6)
    x0 = noise.randn(shape)
    seen = []
    getattr(dpmpp, sampler)(lambda x, s: torch.zeros_like(x), x0 * 14.6, sigmas, generator=noise,
                            callback=lambda step: seen.append(step.x.clone()))
    def f32(value: float) -> float:  # A1111's sigmas are float32 tensors
        return torch.tensor(value, dtype=torch.float32).item()

    trees = [torchsde.BrownianTree(f32(0.3), torch.zeros(shape[1:]), f32(14.6), entropy=seed) for seed in seeds]
    sig = sigmas.tolist()
    for i in range(len(sig) - 2):  # the steps that add noise (the last lands on 0)
        h = math.log(sig[i] / sig[i + 1])
        s, s_next = f32(sig[i]), f32(sig[i + 1])
        z = torch.stack([-tree(s_next, s) for tree in trees]) / math.sqrt(s - s_next)  # k-diffusion's sign, scale
        expected = math.exp(-2 * h) * seen[i] + sig[i + 1] * math.sqrt(-math.expm1(-2 * h)) * z
        assert torch.allclose(seen[i + 1], expected.to(seen[i + 1].dtype), atol=1e-4), i
    alone = SeededNoise([8])
    alone.span = noise.span
    assert torch.allclose(alone.brownian(x0[1:], 6.0, 2.5), noise.brownian(x0, 6.0, 2.5)[1:])  # per image
