"""Fine-tune the built-in shapes model's VAE decoder by the recipe's [decoder] stage, starting from the shipped VAE.

The recipe (configs/shapes.toml) trains every part from scratch in about two hours; its [decoder] stage then
fine-tunes the VAE's decoder with the encoder frozen, so every latent (and the UNet and ControlNet trained on
them) stays as it was. This script runs that stage alone on top of the shipped model: it seeds `--workdir` with
the shipped VAE as the finished vae stage, runs the recipe's decoder stage, prints the recipe's VAE metrics
(reconstruction PSNR, and the attribute judge on round trips, encode then decode, of fresh renders) before and
after, and with `--ship` writes the new VAE (in the recipe's export dtype) into the model folder.

    .venv/bin/python scripts/shapes_decoder.py --workdir runs/shapes-decoder
    .venv/bin/python scripts/shapes_decoder.py --workdir runs/shapes-decoder --ship src/sdtorch/assets/shapes

Resumable: run it again after an interruption.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import sdtorch
from sdtorch.checkpoints.io import atomic_write
from sdtorch.checkpoints.saving import save
from sdtorch.configs import DTYPES
from sdtorch.training.loop import TIMINGS_JSON
from sdtorch.training.recipe import Recipe, RecipeConfig


def ship(pipe: sdtorch.Pipeline, vae: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """Write `vae`'s weights, in `dtype`, over the VAE of the model folder `folder`."""
    pipe.vae.load_state_dict(vae.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        save(pipe.to(dtype=dtype), Path(tmp) / "model", overwrite=True)
        for file in (Path(tmp) / "model" / "vae").iterdir():
            atomic_write(folder / "vae" / file.name, lambda temp, file=file: shutil.copyfile(file, temp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/shapes-decoder"))
    parser.add_argument("--recipe", type=Path, default=Path("configs/shapes.toml"))
    parser.add_argument("--model", type=Path, default=None, help="the model folder to start from (default: built-in)")
    parser.add_argument("--ship", type=Path, default=None, help="write the new VAE into this model folder")
    args = parser.parse_args()

    config = RecipeConfig.from_file(args.recipe)
    if config.decoder is None:
        parser.error(f"{args.recipe} has no [decoder] section")
    recipe = Recipe(config, args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    pipe = sdtorch.load(args.model) if args.model else sdtorch.load()
    with torch.no_grad():
        before = recipe.vae_metrics(pipe.vae.float().eval())
    recipe.adopt_vae(pipe.vae, str(args.model or "the shipped model"))
    recipe.run(until="decoder")
    vae = recipe.vae()
    with torch.no_grad():
        after = recipe.vae_metrics(vae.eval())
    seconds = json.loads((args.workdir / TIMINGS_JSON).read_text(encoding="utf-8"))["decoder"].get("seconds")
    report = {"before": before, "after": after, "decoder_seconds": seconds}
    (args.workdir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2))
    if args.ship:
        ship(pipe, vae, args.ship, DTYPES[config.export.dtype])
        print(f"wrote the new VAE into {args.ship / 'vae'}")


if __name__ == "__main__":
    main()
