"""Sampler accuracy on an analytic data model: error against the exact answer vs model evaluations (NFE),
every sdtorch sampler beside the diffusers scheduler that implements it.

Run (from the repository root; CPU only, about 2-5 minutes on 2 shared cores, --quick about a third):
    .venv/bin/python benchmarks/sampler_accuracy.py [--quick]
It prints markdown tables and writes benchmarks/results/sampler_accuracy.png (needs matplotlib, which is
in the `dev` extra: `pip install -e .[dev]`, or `pip install matplotlib`; without it only the tables).

The model. The data are a 4-D Gaussian mixture (sdtorch.evaluation.analytic), whose ideal denoiser is
exact, wrapped as an eps-predicting "UNet" that both libraries call the way they call SD's UNet:
unet(x_t, t) with x_t = x / sqrt(1 + sigma^2) the variance-preserving latent and
    eps = E[eps | x = x_t * sqrt(1 + sigma(t)^2)],   sigma(t) = exp(log sigmas interpolated at t),
exact at integer t and the inverse of the log-sigma interpolation both libraries use for fractional t.
Ours: sdtorch's `Denoiser` (epsilon) over that UNet, given the grid's own timesteps, drives the sampler
function. diffusers: the scheduler configured to the same grid, its standard loop (scale_model_input, unet,
step), started from the same point (k-diffusion-style schedulers keep x in sigma space, the others the VP
latent; both converted back to sigma space to compare).

Measures, each against the exact answer from the same start x_T = sigma_max * noise (64 trajectories, RMS):
  (a) ODE samplers at sigma_min: the state entering the final step of a Karras grid (..., sigma_min, 0),
      or the output of DDIM / PLMS on the `trailing` grid (which ends at sigma_min): solver accuracy.
  (b) ODE samplers, the final output (sigma = 0 on Karras grids; sigma_min for DDIM / PLMS): what users
      get. Most samplers take the last step, sigma_min -> 0, as x = D(x): a first-order step whose error,
      O(sigma_min^2), is a floor no step count removes.
  (c) Stochastic samplers at their default eta: |mean - mean_data| + |cov - cov_data|_F of 16384 samples,
      beside the Monte-Carlo floor: the same measure on 16384 exact samples (shaded; 4096 with --quick).
Samplers with an eta (Euler a, DPM2 a, DPM++ 2S a / SDE / 2M SDE / 3M SDE) appear in (a, b) at eta = 0,
where they are ODE solvers (Euler a and DPM2 a are then Euler and DPM2, not repeated). diffusers has no
DPM++ 3M SDE: beside ours in (a, b) is its third-order multistep ODE solver, in (c) its sde-dpmsolver++
of order 3. diffusers' UniPC and DPM-Solver round Karras timesteps to integers, so its model sees
sigma(round(t)) where the solver assumes the Karras sigma; "UniPC, unrounded t" shows what that costs.
Step counts divide 1000, so diffusers' DDIM / PNDM step to the next listed timestep and the grids coincide.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor

from sdtorch.evaluation.analytic import GaussianMixture
from sdtorch.sampling import dpmpp, k_samplers, timestep_samplers
from sdtorch.sampling.denoiser import Denoiser
from sdtorch.sampling.schedules import DiscreteSchedule, SamplingSchedule, sampling_schedule

F64 = torch.float64
SCHED = DiscreteSchedule()
SIGMA_MIN, SIGMA_MAX = SCHED.sigma_min, SCHED.sigma_max
RESULTS = Path(__file__).parent / "results"
# diffusers' SD schedule, every field that matters set explicitly
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          prediction_type="epsilon")
KARRAS = dict(SD, use_karras_sigmas=True, timestep_spacing="linspace")  # Karras over the whole sigma range


def mixture() -> GaussianMixture:
    """8 components in 4-D, overall std ~0.5-1.2 like SD latents, component stds 0.3-0.6."""
    gen = torch.Generator().manual_seed(0)
    means = 0.7 * torch.randn(8, 4, generator=gen, dtype=F64)
    stds = 0.3 + 0.3 * torch.rand(8, generator=gen, dtype=F64)
    return GaussianMixture(means, stds, 0.5 + torch.rand(8, generator=gen, dtype=F64))


GM = mixture()


class AnalyticUNet:
    """eps-predicting stand-in for SD's UNet: (x_t (B, D, 1, 1), t) -> E[eps | x_t] at sigma(t); counts calls."""

    def __init__(self, gm: GaussianMixture):
        self.gm, self.calls = gm, 0

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        t = t.to(F64).clamp(0, SCHED.num_train_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=SCHED.num_train_timesteps - 1)
        return torch.lerp(SCHED.log_sigmas[low], SCHED.log_sigmas[high], t - low).exp()

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        self.calls += 1
        sigma = self.sigma(torch.as_tensor(t).reshape(-1)).expand(x_t.shape[0])  # (B,)
        x = x_t.to(F64) * (1 + sigma**2).sqrt()[:, None, None, None]  # back to sigma space
        return self.gm.eps(x, sigma).to(x_t.dtype)


class Model:
    """The sampler-facing model: D(x, sigma) through the Denoiser, and the UNet timestep of a sigma.
    Keeps the x of its last call: the state entering the final step."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.last_x = denoiser, None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.last_x = x
        return self.denoiser(x, sigma, None)

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.denoiser.timestep(torch.as_tensor(sigma, dtype=F64).reshape(-1))


def karras(n: int) -> SamplingSchedule:
    return sampling_schedule(SCHED, n, "karras")


def trailing_to_sigma_min(n: int) -> SamplingSchedule:
    return timestep_samplers.ddim_schedule(SCHED, n, "automatic", "trailing")


@dataclass
class Spec:
    label: str
    sample: Callable[..., Tensor]
    grid: Callable[[int], SamplingSchedule]
    diffusers: Callable[[], object] | None  # the matching scheduler, if diffusers has one
    vp: bool = False  # diffusers keeps the VP latent (True) or x in sigma space (False)
    eta: float | None = 0.0
    max_steps: int = 1000


ODE = [
    Spec("Euler", k_samplers.sample_euler, karras, lambda: EulerDiscreteScheduler(**KARRAS)),
    Spec("Heun", k_samplers.sample_heun, karras, lambda: HeunDiscreteScheduler(**KARRAS)),
    Spec("LMS", k_samplers.sample_lms, karras, lambda: LMSDiscreteScheduler(**KARRAS)),
    Spec("DPM2", k_samplers.sample_dpm_2, karras, lambda: KDPM2DiscreteScheduler(**KARRAS)),
    Spec("DPM++ 2M", dpmpp.sample_dpmpp_2m, karras, lambda: DPMSolverMultistepScheduler(
        **KARRAS, algorithm_type="dpmsolver++", solver_order=2), vp=True),
    # diffusers has no DPM++ 3M SDE; beside it: its third-order multistep ODE solver (DPM-Solver++(3M))
    Spec("DPM++ 3M SDE", dpmpp.sample_dpmpp_3m_sde, karras, lambda: DPMSolverMultistepScheduler(
        **KARRAS, algorithm_type="dpmsolver++", solver_order=3), vp=True),
    Spec("DPM++ 2M SDE", dpmpp.sample_dpmpp_2m_sde, karras, None),
    Spec("DPM++ 2S a", dpmpp.sample_dpmpp_2s_ancestral, karras, None),
    Spec("DPM++ SDE", dpmpp.sample_dpmpp_sde, karras, None),
    Spec("UniPC", timestep_samplers.sample_unipc, lambda n: timestep_samplers.unipc_schedule(SCHED, n, "karras"),
         lambda: UniPCMultistepScheduler(**KARRAS, solver_order=2, solver_type="bh2"), vp=True),
    # the same sampler with the Karras sigmas' own (fractional) timesteps: what diffusers' rounding costs
    Spec("UniPC, unrounded t", timestep_samplers.sample_unipc, karras, None),
    Spec("DDIM", timestep_samplers.sample_ddim, trailing_to_sigma_min, lambda: DDIMScheduler(
        **SD, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False), vp=True),
    Spec("PLMS", timestep_samplers.sample_plms, trailing_to_sigma_min, lambda: PNDMScheduler(
        **SD, timestep_spacing="trailing", set_alpha_to_one=False, skip_prk_steps=True), vp=True),
]
STOCHASTIC = [
    Spec("Euler a", k_samplers.sample_euler_ancestral, lambda n: sampling_schedule(SCHED, n, "automatic", "linspace"),
         lambda: EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace"), eta=None),
    Spec("DPM2 a", k_samplers.sample_dpm_2_ancestral, karras,
         lambda: KDPM2AncestralDiscreteScheduler(**KARRAS), eta=None),
    Spec("DPM++ 2S a", dpmpp.sample_dpmpp_2s_ancestral, karras, None, eta=None),
    Spec("DPM++ SDE", dpmpp.sample_dpmpp_sde, karras, None, eta=None),  # diffusers' needs torchsde
    Spec("DPM++ 2M SDE", dpmpp.sample_dpmpp_2m_sde, karras, lambda: DPMSolverMultistepScheduler(
        **KARRAS, algorithm_type="sde-dpmsolver++", solver_order=2), vp=True, eta=None),
    Spec("DPM++ 3M SDE", dpmpp.sample_dpmpp_3m_sde, karras, lambda: DPMSolverMultistepScheduler(
        **KARRAS, algorithm_type="sde-dpmsolver++", solver_order=3), vp=True, eta=None),
    Spec("DDPM", timestep_samplers.sample_ddpm,
         lambda n: timestep_samplers.ddpm_schedule(SCHED, n, "automatic", "leading"),
         lambda: DDPMScheduler(**SD, timestep_spacing="leading", steps_offset=1, clip_sample=False), vp=True, eta=None),
    Spec("LCM", timestep_samplers.sample_lcm, lambda n: timestep_samplers.lcm_schedule(SCHED, n),
         lambda: LCMScheduler(**SD, original_inference_steps=50), vp=True, eta=None, max_steps=50),
]


@dataclass
class Run:
    nfe: int  # model calls for the final output
    nfe_before_last: int  # model calls before the final step's
    before_last: Tensor  # x entering the final step (what its model call sees), sigma space
    final: Tensor  # x after it, sigma space
    sigmas: Tensor  # the grid walked


def run_ours(spec: Spec, n: int, noise: Tensor, seed: int) -> Run:
    grid = spec.grid(n)
    unet = AnalyticUNet(GM)
    denoiser = Denoiser(unet, SCHED, "epsilon")
    denoiser.use_timesteps_of(grid)
    model = Model(denoiser)
    final = spec.sample(model, noise * grid.sigmas[0], grid.sigmas, generator=torch.Generator().manual_seed(seed),
                        eta=spec.eta)
    return Run(unet.calls, unet.calls - 1, model.last_x, final, grid.sigmas)  # the final steps make one call


def run_diffusers(spec: Spec, n: int, noise: Tensor, seed: int) -> Run:
    """diffusers' loop on the same grid; latents start from our x (converted to its space) and come back."""
    scheduler = spec.diffusers()
    scheduler.set_timesteps(n)
    sigmas = spec.grid(n).sigmas  # the grid it was configured to walk (same start, end and last step)
    unet = AnalyticUNet(GM)
    to_vp = (lambda x, s: x / math.sqrt(1 + s**2)) if spec.vp else (lambda x, s: x)
    from_vp = (lambda x, s: x * math.sqrt(1 + s**2)) if spec.vp else (lambda x, s: x)
    latents = to_vp(noise * sigmas[0], float(sigmas[0]))
    extra = {"generator": torch.Generator().manual_seed(seed)}
    if "generator" not in inspect.signature(scheduler.step).parameters:
        extra = {}
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        if i == len(timesteps) - 1:
            before_last, calls = latents, unet.calls
        eps = unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return Run(unet.calls, calls, from_vp(before_last, float(sigmas[-2])), from_vp(latents, float(sigmas[-1])), sigmas)


def rms(a: Tensor, b: Tensor) -> float:
    return (a.to(F64) - b).square().mean().sqrt().item()


def moment_error(x: Tensor) -> float:
    flat = x.reshape(x.shape[0], -1).to(F64)
    return ((flat.mean(0) - GM.mean).norm() + (flat.T.cov() - GM.covariance).norm()).item()


def ode_rows(steps: list[int], exact: dict[float, Tensor], noise: Tensor) -> list[dict]:
    """Errors (a) at sigma_min and (b) of the final output, ours and diffusers', per sampler and step count."""
    rows = []
    for spec in ODE:
        for n in steps:
            row = {"sampler": spec.label, "steps": n}
            for side, runner in (("ours", run_ours), ("diffusers", run_diffusers)):
                if side == "diffusers" and spec.diffusers is None:
                    continue
                r = runner(spec, n, noise, seed=0)
                assert abs(float(r.sigmas[0]) / SIGMA_MAX - 1) < 1e-12, "the exact solutions start at sigma_max"
                end = float(r.sigmas[-1])
                at_min = (r.final, r.nfe) if end > 0 else (r.before_last, r.nfe_before_last)  # (a)
                row[side] = {"nfe_a": at_min[1], "err_a": rms(at_min[0], exact[SIGMA_MIN]),
                             "nfe_b": r.nfe, "err_b": rms(r.final, exact[end])}
            rows.append(row)
    return rows


def stochastic_rows(steps: list[int], samples: int) -> list[dict]:
    rows = []
    noise = torch.randn(samples, GM.dim, 1, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    for spec in STOCHASTIC:
        for n in (n for n in steps if n <= spec.max_steps):
            row = {"sampler": spec.label, "steps": n}
            for side, runner in (("ours", run_ours), ("diffusers", run_diffusers)):
                if side == "diffusers" and spec.diffusers is None:
                    continue
                r = runner(spec, n, noise, seed=3)
                row[side] = {"nfe": r.nfe, "err": moment_error(r.final)}
            rows.append(row)
    return rows


def print_ode_table(rows: list[dict]) -> None:
    print("\n## ODE samplers (eta 0): RMS error vs the exact solution; (a) at sigma_min, (b) final output")
    print("| sampler | steps | NFE (a) | ours (a) | diffusers (a) | NFE (b) | ours (b) | diffusers (b) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        o, d = row["ours"], row.get("diffusers")
        nfe_a = f"{o['nfe_a']}" + (f" / {d['nfe_a']}" if d and d["nfe_a"] != o["nfe_a"] else "")
        nfe_b = f"{o['nfe_b']}" + (f" / {d['nfe_b']}" if d and d["nfe_b"] != o["nfe_b"] else "")
        da, db = (f"{d['err_a']:.2e}", f"{d['err_b']:.2e}") if d else ("-", "-")
        print(f"| {row['sampler']} | {row['steps']} | {nfe_a} | {o['err_a']:.2e} | {da} "
              f"| {nfe_b} | {o['err_b']:.2e} | {db} |")


def print_summary(rows: list[dict], target: float = 1e-3) -> None:
    """NFE to reach `target` at sigma_min (log-log interpolation) and the order fitted on the last 4 points."""
    print(f"\n## Summary (a): NFE to reach RMS error {target:g} at sigma_min; order fitted on the 4 finest runs")
    print("| sampler | NFE ours | NFE diffusers | order ours | order diffusers |")
    print("|---|---:|---:|---:|---:|")
    for label in dict.fromkeys(r["sampler"] for r in rows):
        cells = []
        for side in ("ours", "diffusers"):
            points = [(r[side]["nfe_a"], r[side]["err_a"]) for r in rows if r["sampler"] == label and side in r]
            cells.append((nfe_at(points, target), order(points[-4:]) if len(points) >= 4 else None))
        (n_o, p_o), (n_d, p_d) = cells
        show = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {label} | {show(n_o, '.0f')} | {show(n_d, '.0f')} | {show(p_o, '.2f')} | {show(p_d, '.2f')} |")


def nfe_at(points: list[tuple[int, float]], target: float) -> float | None:
    for (n0, e0), (n1, e1) in zip(points, points[1:]):
        if e0 > target >= e1 and n1 > n0:
            w = math.log(e0 / target) / math.log(e0 / e1)
            return math.exp(math.log(n0) + w * math.log(n1 / n0))
    return points[0][0] if points and points[0][1] <= target else None


def order(points: list[tuple[int, float]]) -> float:
    """Minus the least-squares slope of log(error) against log(NFE)."""
    x = torch.tensor([math.log(n) for n, _ in points], dtype=F64)
    y = torch.tensor([math.log(e) for _, e in points], dtype=F64)
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / x.square().sum())


def print_stochastic_table(rows: list[dict], floor: float) -> None:
    print(f"\n## Stochastic samplers (default eta): moment error of the samples (Monte-Carlo floor {floor:.3f})")
    print("| sampler | steps | NFE | ours | diffusers |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        o, d = row["ours"], row.get("diffusers")
        nfe = f"{o['nfe']}" + (f" / {d['nfe']}" if d and d["nfe"] != o["nfe"] else "")
        theirs = f"{d['err']:.3f}" if d else "-"
        print(f"| {row['sampler']} | {row['steps']} | {nfe} | {o['err']:.3f} | {theirs} |")


def plot(ode: list[dict], stochastic: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5))
    panels = [
        (axes[0], ode, "nfe_a", "err_a", "(a) ODE solvers: RMS error at sigma_min"),
        (axes[1], ode, "nfe_b", "err_b", "(b) ODE solvers: RMS error of the final output"),
        (axes[2], stochastic, "nfe", "err", "(c) stochastic samplers: moment error of the samples"),
    ]
    palette = [plt.cm.tab20(i) for i in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 5, 9, 13)]
    for ax, rows, nfe_key, err_key, title in panels:
        labels = list(dict.fromkeys(r["sampler"] for r in rows))
        for label, color in zip(labels, palette):
            for side, ls, marker in (("ours", "-", "o"), ("diffusers", "--", "x")):
                pts = [(r[side][nfe_key], r[side][err_key]) for r in rows if r["sampler"] == label and side in r]
                if pts:
                    ax.loglog(*zip(*pts), ls=ls, marker=marker, ms=4, lw=1.3, color=color,
                              label=label if side == "ours" else None)
        if rows is stochastic:
            ax.axhspan(ax.get_ylim()[0], floor, color="0.85", zorder=0, label="Monte-Carlo floor")
        ax.set(title=title, xlabel="model evaluations (NFE)", ylabel="error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Samplers on a Gaussian-mixture data model with its exact denoiser "
                 "(solid, o: sdtorch; dashed, x: the diffusers scheduler)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer step counts and samples")
    parser.add_argument("--out", type=Path, default=RESULTS / "sampler_accuracy.png")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    steps = [4, 8, 20, 50, 125] if args.quick else [4, 5, 8, 10, 20, 25, 40, 50, 100, 125]
    samples = 4096 if args.quick else 16384
    start = time.time()

    noise = torch.randn(64, GM.dim, 1, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    x_T = noise * SIGMA_MAX  # every ODE grid here starts at sigma_max
    ends = torch.tensor([SIGMA_MAX, SIGMA_MIN, 0.0], dtype=F64)
    exact = {SIGMA_MIN: GM.ode_solution(x_T, ends[:2]), 0.0: GM.ode_solution(x_T, ends[::2])}
    ode = ode_rows(steps, exact, noise)
    print_ode_table(ode)
    print_summary(ode)

    gen = torch.Generator().manual_seed(4)
    floor = sum(moment_error(GM.sample(samples, gen)) for _ in range(16)) / 16
    stochastic = stochastic_rows(steps, samples)
    print_stochastic_table(stochastic, floor)
    print(f"\n{time.time() - start:.0f} s")
    try:
        plot(ode, stochastic, floor, args.out)
    except ImportError:
        print("matplotlib is not installed: tables only (pip install matplotlib)")


if __name__ == "__main__":
    main()
