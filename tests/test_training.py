"""Training code: determinism, exact resumption, EMA, and each trainer's loss on tiny fixed batches."""

import dataclasses
import json

import pytest
import torch
from conftest import assert_parity
from torch import nn

from sdtorch.configs import TINY_SD1
from sdtorch.data.shapes import ShapesDataset
from sdtorch.errors import CheckpointError, InvalidInputError, NonFiniteError
from sdtorch.models.clip import CLIPTextEncoder
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.models.unet import UNet
from sdtorch.models.vae import AutoencoderKL
from sdtorch.sampling.schedules import DiscreteSchedule
from sdtorch.training.bpe import train_bpe
from sdtorch.training.contrastive import CLIPConfig, CLIPModel, ImageEncoderConfig, clip_loss, clip_step, retrieval_top1
from sdtorch.training.diffusion import (
    TextConditioner, add_noise, diffusion_loss, min_snr_weights, unet_step, velocity,
)
from sdtorch.training.loop import (
    EMA, TrainState, batch_indices, resume, save_checkpoint, step_generator, train, warmup_cosine,
)
from sdtorch.training.vae import (
    cache_latents, estimate_scaling_factor, foreground_weights, kl_divergence, load_latents, vae_loss, vae_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16  # image side in the tests: the tiny VAE (2 levels) makes 8x8 latents of it, as SD's makes of 64


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    data = ShapesDataset(64, seed=1, size=8)
    vocab, merges = train_bpe((data[i]["caption"] for i in range(len(data))), vocab_size=600)
    return CLIPTokenizer(vocab, merges, max_length=24)


@pytest.fixture(scope="module")
def text_config(tokenizer):
    return dataclasses.replace(
        TINY_SD1.text_encoder, vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def logged(step_fn, state, steps, batch_size, key="loss"):
    """The mean of `key` over each window of 5 steps."""
    log = []
    train(step_fn, state, steps, batch_size=batch_size, log_every=5, log=log.append)
    return [entry[key] for entry in log]


# ---- determinism helpers -------------------------------------------------------------------------------


def test_batch_indices_visit_each_item_once_per_epoch():
    n, bs = 10, 4
    flat = [i for step in range(5) for i in batch_indices(7, step, bs, n)]  # 20 = two epochs
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch its own order
    assert batch_indices(7, 3, bs, n) == batch_indices(7, 3, bs, n) != batch_indices(8, 3, bs, n)
    assert len(batch_indices(0, 0, 25, 10)) == 25  # batches larger than the dataset span epochs


def test_step_generator_depends_only_on_seed_step_stream():
    def draw(*args):
        return torch.randn(4, generator=step_generator(*args))

    assert torch.equal(draw(1, 5), draw(1, 5))
    assert not torch.equal(draw(1, 5), draw(1, 6))
    assert not torch.equal(draw(1, 5), draw(2, 5))
    assert not torch.equal(draw(1, 5, 0), draw(1, 5, 1))


# ---- EMA ---------------------------------------------------------------------------------------------


def test_ema_math():
    model = nn.Linear(3, 2)
    values = [torch.randn_like(model.weight) for _ in range(3)]
    expected = model.weight.detach().double().clone()
    ema = EMA(model, decay=0.9)
    for v in values:
        with torch.no_grad():
            model.weight.copy_(v)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * v.double()
    assert_parity(ema.shadow["weight"].double(), expected, rel=1e-6)

    # inside `averaged` the model holds the averages; afterwards its own weights again
    with ema.averaged(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, values[-1])

    warm = EMA(model, decay=0.5, warmup=True)
    decays = []
    for _ in range(12):
        decays.append(warm.current_decay())
        warm.update(model)
    assert decays[:3] == [1 / 10, 2 / 11, 3 / 12] and decays[-1] == 0.5

    copy = EMA(nn.Linear(3, 2), decay=0.1)
    copy.load_state_dict(ema.state_dict())
    assert copy.decay == 0.9 and copy.num_updates == 3 and torch.equal(copy.shadow["weight"], ema.shadow["weight"])


# ---- checkpoints and exact resumption --------------------------------------------------------------------


class Interrupted(Exception):
    pass


def mlp_run(folder, steps, interrupt_at=None, init_seed=0):
    """A tiny regression model with dropout (global RNG), AdamW, warm-up + cosine LR, EMA and clipping."""
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    state = TrainState(
        models={"mlp": model}, optimizer=optimizer, scheduler=warmup_cosine(optimizer, 3, steps),
        ema={"mlp": EMA(model, 0.9, warmup=True)}, seed=11, config={"lr": 1e-2, "sizes": (4, 16, 1)},
    )
    inputs = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    targets = inputs.sum(1, keepdim=True)

    def step(state):
        if state.step == interrupt_at:
            raise Interrupted
        idx = batch_indices(state.seed, state.step, 8, 32)
        noise = 0.01 * torch.randn(8, 1, generator=step_generator(state.seed, state.step))
        return nn.functional.mse_loss(model(inputs[idx]), targets[idx] + noise)

    try:
        train(step, state, steps, batch_size=8, folder=folder, checkpoint_every=3, log_every=2, max_grad_norm=1.0)
    except Interrupted:
        pass
    return state


def assert_states_equal(a: TrainState, b: TrainState):
    assert a.step == b.step
    for name in a.models:
        sa, sb = a.models[name].state_dict(), b.models[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} weights differ"
    for name in a.ema:
        assert all(torch.equal(a.ema[name].shadow[k], b.ema[name].shadow[k]) for k in a.ema[name].shadow)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, entry in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in entry.items()), "optimizer state differs"
    if a.scheduler is not None:
        assert a.scheduler.state_dict() == b.scheduler.state_dict()


def test_resume_is_bit_identical(tmp_path):
    full = mlp_run(tmp_path / "full", steps=10)
    rng_after_full = torch.get_rng_state()

    cut = mlp_run(tmp_path / "cut", steps=10, interrupt_at=5)  # last checkpoint at step 3
    assert cut.step == 5 and json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] == 3
    resumed = mlp_run(tmp_path / "cut", steps=10, init_seed=123)  # other initial weights: all must come from the file
    assert_states_equal(full, resumed)
    assert torch.equal(torch.get_rng_state(), rng_after_full)  # dropout's global RNG stream restored too
    assert not torch.equal(full.models["mlp"][0].weight, cut.models["mlp"][0].weight)  # the check is not vacuous


def test_resume_unet_trainer_bit_identical(tmp_path, tokenizer, text_config):
    captions = ["a red circle", "a small blue square in the top left", "green star", "a large white cross"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    conditioner = TextConditioner(CLIPTextEncoder(text_config), tokenizer)

    def run(folder, interrupt_at=None, init_seed=0):
        torch.manual_seed(init_seed)
        unet = UNet(TINY_SD1.unet)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        state = TrainState(models={"unet": unet}, optimizer=optimizer, ema={"unet": EMA(unet, 0.99)}, seed=3)
        inner = unet_step(unet, latents, captions, conditioner, DiscreteSchedule(), batch_size=2, cfg_dropout=0.5)

        def step(state):
            if state.step == interrupt_at:
                raise Interrupted
            return inner(state)

        try:
            train(step, state, 5, batch_size=2, folder=folder, checkpoint_every=2)
        except Interrupted:
            pass
        return state

    full = run(tmp_path / "full")
    run(tmp_path / "cut", interrupt_at=3)
    assert_states_equal(full, run(tmp_path / "cut", init_seed=1))


def test_checkpoint_folder_contents_and_config_check(tmp_path):
    state = mlp_run(tmp_path, steps=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json", "log.jsonl", "step-00000007.safetensors", "timings.json"
    ]  # older tensor files removed once the new checkpoint was committed
    timing = json.loads((tmp_path / "timings.json").read_text())["train"]
    assert timing["steps"] == 7 and timing["done"] and timing["seconds"] > 0 and timing["images_per_s"] > 0
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [2, 4, 6, 7] and all("images_per_s" in e and "lr" in e for e in logged)

    again = mlp_run(tmp_path, steps=7, init_seed=5)  # done already: loads the checkpoint, trains nothing
    assert_states_equal(state, again)

    other = mlp_run(tmp_path / "elsewhere", steps=1)
    other.config = {"lr": 0.5}
    with pytest.raises(InvalidInputError, match="different training config"):
        resume(other, tmp_path)
    assert resume(other, tmp_path / "empty") is False

    (tmp_path / "step-00000007.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError):
        resume(state, tmp_path)


def test_non_finite_loss_stops_before_checkpointing(tmp_path):
    model = nn.Linear(2, 1)
    state = TrainState(models={"m": model}, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))

    def step(state):
        loss = model(torch.ones(1, 2)).sum()
        return loss * float("nan") if state.step == 2 else loss

    with pytest.raises(NonFiniteError, match="by step 3"):
        train(step, state, 10, batch_size=1, folder=tmp_path, checkpoint_every=3, log_every=1)
    assert not (tmp_path / "checkpoint.json").exists()


def test_optimizer_state_survives_save_and_load(tmp_path):
    # integer-keyed optimizer state, tuples (Adam's betas) and 0-dim tensors round-trip through JSON + safetensors
    model = nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(TrainState(models={"m": model}, optimizer=optimizer, step=1), tmp_path)
    fresh_model = nn.Linear(3, 3)
    fresh = TrainState(models={"m": fresh_model}, optimizer=torch.optim.Adam(fresh_model.parameters()))
    assert resume(fresh, tmp_path) and fresh.step == 1
    assert fresh.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert_states_equal(TrainState(models={"m": model}, optimizer=optimizer, step=1), fresh)


# ---- VAE ---------------------------------------------------------------------------------------------


def test_vae_loss_terms():
    vae = AutoencoderKL(TINY_SD1.vae)
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    out = vae_loss(vae, images, kl_weight=0.01, edge_weight=0.5, mse_weight=2.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["loss"], out["l1"] + 0.01 * out["kl"] + 0.5 * out["edge"] + 2.0 * out["mse"])
    recon = vae.decode(vae.encode(images).sample(torch.Generator().manual_seed(0)))  # the same posterior draw
    assert_parity(out["mse"], torch.nn.functional.mse_loss(recon, images))

    posterior = vae.encode(images)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(posterior.mean, posterior.std), torch.distributions.Normal(0.0, 1.0)
    ).mean()
    assert_parity(kl_divergence(posterior), reference)


def test_foreground_weights_lift_a_small_object_to_its_share():
    images = torch.zeros(2, 3, 8, 8)  # image 0: gray with a 2x2 red square; image 1: flat gray
    images[0, 0, 2:4, 2:4] = 0.9
    w = foreground_weights(images, weight=4.0)
    assert w.shape == (2, 1, 8, 8)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2))
    inside, outside = w[0, 0, 2, 2], w[0, 0, 0, 0]
    assert torch.allclose(inside / outside, torch.tensor(5.0))  # 1 + weight
    assert (w[0, 0, 2:4, 2:4] == inside).all() and (w[0].sum() - 4 * inside).isclose(60 * outside)
    assert torch.equal(w[1], torch.ones(1, 8, 8))  # nothing stands out: plain mean


def test_vae_loss_weights_pixel_terms_by_foreground():
    vae = AutoencoderKL(TINY_SD1.vae)
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[:, 1, :4, :4] = 0.8
    out = vae_loss(vae, images, kl_weight=0.0, edge_weight=1.0, mse_weight=1.0, foreground_weight=3.0,
                   generator=torch.Generator().manual_seed(0))
    recon = vae.decode(vae.encode(images).sample(torch.Generator().manual_seed(0)))
    w = foreground_weights(images, 3.0)
    assert_parity(out["l1"], ((recon - images).abs() * w).mean())
    assert_parity(out["mse"], ((recon - images).square() * w).mean())
    dx = (recon.diff(dim=3) - images.diff(dim=3)).abs() * w[..., :, :-1]
    dy = (recon.diff(dim=2) - images.diff(dim=2)).abs() * w[..., :-1, :]
    assert_parity(out["edge"], 0.5 * (dx.mean() + dy.mean()))
    plain = vae_loss(vae, images, kl_weight=0.0, generator=torch.Generator().manual_seed(0))
    assert not torch.isclose(plain["l1"], out["l1"])


def test_vae_overfits_a_fixed_batch():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_SD1.vae)
    state = TrainState(models={"vae": vae}, optimizer=torch.optim.Adam(vae.parameters(), lr=3e-3))
    step = vae_step(vae, ShapesDataset(2, size=SIZE), batch_size=2, edge_weight=0.5)
    l1 = logged(step, state, 25, 2, key="l1")
    assert l1[-1] < 0.4 * l1[0], l1


def test_latent_cache_round_trip_and_scaling_factor(tmp_path):
    vae = AutoencoderKL(TINY_SD1.vae)
    data = ShapesDataset(5, seed=2, size=SIZE)
    factor = estimate_scaling_factor(vae, data, batch_size=2, sample=False)
    written = cache_latents(vae, data, tmp_path / "latents.safetensors", batch_size=2, scaling_factor=factor)
    latents, info = load_latents(tmp_path / "latents.safetensors")

    assert torch.equal(latents, written) and latents.shape == (5, 4, SIZE // 2, SIZE // 2)
    with torch.no_grad():
        expected = vae.encode(torch.stack([data[i]["image"] for i in range(5)])).mean * factor
    assert_parity(latents, expected)
    assert abs(latents.double().std().item() - 1.0) < 1e-6  # 1/std makes the scaled latents unit-variance
    assert info["scaling_factor"] == factor and info["count"] == 5
    assert info["captions"] == [data[i]["caption"] for i in range(5)]
    assert info["attributes"] == [dataclasses.asdict(data[i]["attributes"]) for i in range(5)]

    sampled = cache_latents(vae, data, tmp_path / "s.safetensors", batch_size=2, sample=True, scaling_factor=factor)
    assert torch.equal(sampled, cache_latents(vae, data, tmp_path / "s.safetensors", batch_size=2, sample=True,
                                              scaling_factor=factor))  # samples drawn from (seed, batch)
    assert not torch.equal(sampled, latents)

    info["count"] = 4
    (tmp_path / "latents.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="disagree"):
        load_latents(tmp_path / "latents.safetensors")


# ---- contrastive ---------------------------------------------------------------------------------------


def tiny_clip(text_config) -> CLIPModel:
    text = dataclasses.replace(text_config, width=64, mlp_width=128, projection_dim=32)
    return CLIPModel(CLIPConfig(text=text, image=ImageEncoderConfig(image_size=SIZE, channels=(16, 32), width=64)))


def test_clip_text_tower_matches_transformers(tokenizer, text_config):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = tiny_clip(text_config).eval()
    cfg = model.config.text
    reference = CLIPTextModelWithProjection(CLIPTextConfig(**cfg.to_diffusers())).eval()
    weights = {f"text_model.{k}": v for k, v in model.text_model.state_dict().items()}
    weights["text_projection.weight"] = model.text_projection.weight
    reference.load_state_dict(weights, strict=True)
    ids = tokenizer(["a red circle", "a large blue star in the top left corner on gray", ""])
    with torch.no_grad():
        expected = reference(input_ids=ids).text_embeds
        assert_parity(model.encode_text(ids), expected / expected.norm(dim=-1, keepdim=True))


def test_clip_loss_matches_transformers():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    logits = torch.randn(6, 6) * 5
    assert_parity(clip_loss(logits), image_text_contrastive_loss(logits))


def test_clip_overfits_and_retrieves(tokenizer, text_config):
    torch.manual_seed(0)
    model = tiny_clip(text_config)
    data = ShapesDataset(8, seed=0, size=SIZE)
    state = TrainState(models={"clip": model}, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3))
    losses = logged(clip_step(model, data, tokenizer, batch_size=8), state, 30, 8)
    images = torch.stack([data[i]["image"] for i in range(8)])
    top1 = retrieval_top1(model, images, [data[i]["caption"] for i in range(8)], tokenizer)
    assert losses[-1] < 0.2 * losses[0], losses
    assert top1 == 1.0


def test_retrieval_top1_counts_matches():
    class Toy(nn.Module):
        """Caption i embeds as unit vector e_i; image j as e_perm[j]: caption i finds image perm^-1(i)."""

        def __init__(self, perm):
            super().__init__()
            self.perm = perm
            self.anchor = nn.Parameter(torch.zeros(()))

        def encode_text(self, ids):
            return nn.functional.one_hot(ids[:, 0], 5).float()

        def encode_image(self, images):
            return nn.functional.one_hot(self.perm[images[:, 0, 0, 0].long()], 5).float()

    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)

    def ids_of(captions):
        return torch.tensor([[int(c)] for c in captions])

    captions = [str(i) for i in range(5)]
    assert retrieval_top1(Toy(torch.arange(5)), images, captions, ids_of) == 1.0
    assert retrieval_top1(Toy(torch.tensor([1, 0, 2, 3, 4])), images, captions, ids_of, batch_size=2) == 0.6


# ---- diffusion ---------------------------------------------------------------------------------------


def test_noising_matches_diffusers():
    from diffusers import DDPMScheduler

    schedule = DiscreteSchedule(TINY_SD1.schedule)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert_parity(add_noise(schedule, x0, noise, t), reference.add_noise(x0, noise, t))
    assert_parity(velocity(schedule, x0, noise, t), reference.get_velocity(x0, noise, t))


def _counting(tokenizer, calls: list):
    """`tokenizer`, recording each list of texts it is called with in `calls`."""

    def counting(texts):
        calls.append(list(texts))
        return tokenizer(texts)

    return counting


def test_cfg_dropout_uses_the_cached_empty_context(tokenizer, text_config):
    calls = []
    counting = _counting(tokenizer, calls)
    conditioner = TextConditioner(CLIPTextEncoder(text_config), counting)
    captions = ["a red circle", "a blue square", "a green star"]
    drop = torch.tensor([True, False, True])
    context = conditioner(captions, drop)
    conditioner(captions, drop)
    assert calls.count([""]) == 1  # the empty prompt is encoded once
    assert_parity(context[1:2], conditioner.encode(["a blue square"]))
    assert torch.equal(context[0], conditioner.empty()[0]) and torch.equal(context[2], conditioner.empty()[0])
    assert not any(p.requires_grad for p in conditioner.text_encoder.parameters())

    # in the step: cfg_dropout=1 gives the UNet only the empty context, 0 only the captions'
    unet = UNet(TINY_SD1.unet)
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    latents = torch.randn(3, 4, 8, 8)
    state = TrainState(models={"unet": unet}, optimizer=torch.optim.SGD(unet.parameters(), lr=0.0))
    for p in (1.0, 0.0):
        unet_step(unet, latents, captions, conditioner, DiscreteSchedule(), batch_size=3, cfg_dropout=p)(state)
    empty = conditioner.empty().expand(3, -1, -1)
    assert torch.equal(seen[0], empty)
    assert not torch.equal(seen[1][0], empty[0])


def test_precomputed_contexts_equal_encoded_ones_without_the_encoder(tokenizer, text_config):
    calls = []
    counting = _counting(tokenizer, calls)
    conditioner = TextConditioner(CLIPTextEncoder(text_config), counting)
    captions = ["a red circle", "a blue square", "a red circle", "a green star", "a white cross"]
    fresh = conditioner.encode(["a green star", "a red circle"])
    conditioner.precompute(captions, batch_size=2)
    assert calls[1:] == [["a red circle", "a blue square"], ["a green star", "a white cross"]]  # distinct, batched
    calls.clear()
    assert_parity(conditioner.encode(["a green star", "a red circle"]), fresh)
    assert calls == []  # read from memory
    conditioner.encode(["a purple diamond"])  # not precomputed: encoded
    assert calls == [["a purple diamond"]]


def test_unet_overfits_a_fixed_batch(tokenizer, text_config):
    torch.manual_seed(0)
    conditioner = TextConditioner(CLIPTextEncoder(text_config), tokenizer)
    captions = ["a red circle", "a blue square", "a small green star", "a white cross in the top left"]
    latents = torch.randn(4, 4, 8, 8)
    unet = UNet(TINY_SD1.unet)
    schedule = DiscreteSchedule()

    def held_out_loss():  # the same timesteps and noise before and after
        with torch.no_grad():
            context = conditioner(captions)
            return diffusion_loss(unet, latents, context, schedule, generator=step_generator(99, 0))["loss"]

    before = held_out_loss()
    state = TrainState(models={"unet": unet}, optimizer=torch.optim.Adam(unet.parameters(), lr=2e-3))
    losses = logged(unet_step(unet, latents, captions, conditioner, schedule, batch_size=4), state, 20, 4)
    assert held_out_loss() < 0.7 * before and losses[-1] < losses[0], (before, losses)


def test_min_snr_weighting():
    schedule = DiscreteSchedule()
    abar = schedule.alphas_cumprod
    snr = abar / (1 - abar)
    t = torch.tensor([0, 999])
    # low noise: SNR far above gamma -> gamma / SNR; high noise: SNR below gamma -> 1 (epsilon), SNR / (SNR + 1) (v)
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "epsilon"), torch.tensor([5.0 / snr[0].item(), 1.0]))
    assert torch.allclose(min_snr_weights(schedule, t, 5.0, "v_prediction"),
                          torch.tensor([5.0 / (snr[0].item() + 1), snr[999].item() / (snr[999].item() + 1)]))

    # the weighted loss is the weighted mean of per-sample MSEs, drawn from the same timesteps and noise
    torch.manual_seed(0)
    unet = UNet(TINY_SD1.unet).eval()
    latents, context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, TINY_SD1.unet.context_dim)
    seen = {}
    unet.register_forward_hook(lambda module, args, out: seen.update(t=args[1], x_t=args[0], out=out))
    with torch.no_grad():
        plain = diffusion_loss(unet, latents, context, schedule, generator=step_generator(1, 0))["loss"]
        weighted = diffusion_loss(unet, latents, context, schedule, generator=step_generator(1, 0), snr_gamma=5.0)["loss"]
        huge = diffusion_loss(unet, latents, context, schedule, generator=step_generator(1, 0), snr_gamma=1e9)["loss"]
    a = abar[seen["t"]].float().view(-1, 1, 1, 1)
    noise = (seen["x_t"] - a.sqrt() * latents) / (1 - a).sqrt()  # recover the drawn noise
    per_sample = (seen["out"] - noise).pow(2).flatten(1).mean(1)
    expected = (min_snr_weights(schedule, seen["t"], 5.0, "epsilon") * per_sample).mean()
    assert_parity(weighted, expected, rel=1e-4)
    assert_parity(huge, plain)  # gamma above every SNR: every weight is 1
    assert not torch.allclose(weighted, plain)
    with pytest.raises(InvalidInputError, match="snr_gamma"):
        diffusion_loss(unet, latents, context, schedule, generator=step_generator(1, 0), snr_gamma=0.0)
