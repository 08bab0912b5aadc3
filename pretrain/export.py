"""``python -m pretrain.export --run RUN_DIR --out RELEASE_DIR [--tag global_stepN]``

Turns a run's checkpoint (the latest one unless ``--tag``) into a release directory
(``pretrain.release``): the fp32 weights consolidated from however many ranks and whatever
ZeRO stage wrote them, the model config, the tokenizer and the feature spec. DeepSpeed is
needed here, to read its checkpoint; loading the release needs neither DeepSpeed nor the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("pretrain.export")


def export(run_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write the release of ``run_dir``'s checkpoint ``tag`` (default: latest) to ``out_dir``."""
    if not Path(run_dir).is_dir():  # before the imports below (seconds): a mistyped --run is reported at once
        raise FileNotFoundError(f"{run_dir} is not a pretraining run directory: no such directory")
    from transformers import AutoTokenizer

    from preprocess.feature_format import FeatureSpec
    from pretrain import checkpoint
    from pretrain.engine import RunPaths
    from pretrain.model import ImageBertConfig, ImageBertForPretraining
    from pretrain.release import save_release
    from pretrain.weights import load_model

    paths = RunPaths(run_dir)
    if not (paths.model / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a pretraining run directory: {paths.model / 'config.json'} is missing")
    if tag is None:
        state = checkpoint.latest_state(paths.checkpoints)
        if state is None:
            raise FileNotFoundError(f"{paths.checkpoints} has no checkpoint ({checkpoint.LATEST_FILE} is missing)")
        tag = state.tag
    model = load_model(
        ImageBertForPretraining, None, config=ImageBertConfig.from_pretrained(paths.model),
        state_dict=checkpoint.consolidated_weights(paths.checkpoints, tag), what=f"checkpoint {tag} of {run_dir}",
    )
    out = save_release(model, AutoTokenizer.from_pretrained(paths.model), FeatureSpec.load(paths.root), out_dir)
    log.info("exported %s of %s to %s", tag, run_dir, out)
    return out


def export_command(prog: str, description: str, export_run: Callable[..., Path], argv: list[str] | None) -> int:
    """The command line of an export (``python -m pretrain.export`` and ``python -m finetune.export``):
    ``--run RUN_DIR --out DIR [--tag TAG]``; exit 2 with a one-line error when the run cannot be read."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--run", required=True, help="the run directory")
    parser.add_argument("--out", required=True, help="the directory to write (replaced atomically)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: the latest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading a checkpoint needs no GPU
    try:
        out = export_run(args.run, args.out, args.tag)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog.split()[-1]}: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return export_command("python -m pretrain.export", __doc__.split("\n\n")[0], export, argv)


if __name__ == "__main__":
    sys.exit(main())
