"""Fine-tuned models on disk: ``python -m finetune.export --run RUN_DIR --out DIR [--tag global_stepN]``,
and ``load_finetuned``, which reads any of them.

A fine-tuned model is found in one of three places:

- a fine-tuning run directory (its latest checkpoint), or one checkpoint tag directory in it
  (``RUN_DIR/checkpoints/global_stepN``): DeepSpeed's files, consolidated to fp32 on load;
- an export directory written here, which needs neither DeepSpeed nor the run::

      config.json            the encoder's ImageBertConfig
      model.safetensors      the whole fine-tuned model (encoder, fusion parameters, task head)
      finetune_config.yaml   the run's resolved config (task and fusion rebuild the model)
      tokenizer files, feature_spec.json

``finetune.evaluate --checkpoint`` accepts all three.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("finetune.export")

EXPORT_CONFIG = "finetune_config.yaml"


@dataclass
class Finetuned:
    model: object  # finetune.tasks.FinetuneModel, in eval mode
    cfg: object  # finetune.config.FinetuneConfig
    tokenizer: object
    spec: object  # preprocess.feature_format.FeatureSpec
    source: Path  # the export directory or the checkpoint tag directory it came from
    run_dir: Path  # where results.json goes by default (an export's own directory)


@dataclass
class Location:
    """Where a fine-tuned model is: an export (``tag`` None) or a checkpoint ``tag`` of run ``root``."""

    root: Path  # the export directory or the run directory: config, tokenizer, feature spec
    tag: str | None = None


def locate(path: str | Path) -> Location:
    """Resolve ``path`` (an export, a run directory or a checkpoint in one); raises naming what is missing."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        return Location(path)
    if (path / "config.yaml").is_file():
        from pretrain import checkpoint  # imports torch: only for a run directory

        state = checkpoint.latest_state(path / "checkpoints")
        if state is None:
            raise FileNotFoundError(f"{path}: no checkpoint yet ({path / 'checkpoints' / checkpoint.LATEST_FILE} is missing)")
        return Location(path, state.tag)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return Location(path.parent.parent, path.name)
    raise FileNotFoundError(
        f"{path} is neither a fine-tuned export ({EXPORT_CONFIG}), a fine-tuning run directory (config.yaml) "
        "nor a checkpoint inside one"
    )


def load_finetuned(path: str | Path | Location) -> Finetuned:
    """The fine-tuned model at ``path``: an export directory, a run directory, or a checkpoint in one."""
    # First, before the imports below (seconds): a wrong path is reported at once.
    where = path if isinstance(path, Location) else locate(path)
    from transformers import AutoTokenizer

    from finetune.config import FinetuneConfig
    from finetune.tasks import FinetuneModel
    from preprocess.config import load_config
    from preprocess.feature_format import FeatureSpec
    from pretrain import checkpoint
    from pretrain.engine import RunPaths
    from pretrain.model import ImageBertConfig
    from pretrain.weights import load_model

    spec = FeatureSpec.load(where.root)
    if where.tag is None:
        cfg = load_config(FinetuneConfig, where.root / EXPORT_CONFIG)
        model = load_model(FinetuneModel, where.root, cfg.task, cfg.fusion, what=f"fine-tuned model {where.root}")
        return Finetuned(model, cfg, AutoTokenizer.from_pretrained(where.root), spec, where.root, where.root)
    paths = RunPaths(where.root)
    cfg = load_config(FinetuneConfig, paths.config)
    model = load_model(
        FinetuneModel, None, cfg.task, cfg.fusion, config=ImageBertConfig.from_pretrained(paths.model),
        state_dict=checkpoint.consolidated_weights(paths.checkpoints, where.tag),
        what=f"checkpoint {paths.checkpoints / where.tag}",
    )
    tokenizer = AutoTokenizer.from_pretrained(paths.model)
    return Finetuned(model, cfg, tokenizer, spec, paths.checkpoints / where.tag, paths.root)


def export(run: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write the fine-tuned model of ``run``'s checkpoint ``tag`` (default: latest) to ``out_dir``, atomically."""
    finetuned = load_finetuned(Path(run) / "checkpoints" / tag if tag else run)
    save_export(finetuned, out_dir)
    log.info("exported %s to %s", finetuned.source, out_dir)
    return Path(out_dir)


def save_export(finetuned: Finetuned, out_dir: str | Path) -> None:
    """An export directory (module docstring), atomically: safetensors, JSON and YAML only, so
    loading it runs no pickle."""
    from preprocess.atomic import replace_directory
    from preprocess.config import dump_yaml
    from pretrain.weights import quiet_transformers

    with replace_directory(out_dir) as tmp, quiet_transformers():
        finetuned.model.save_pretrained(tmp)
        finetuned.tokenizer.save_pretrained(tmp)
        finetuned.spec.save(tmp)
        dump_yaml(finetuned.cfg, tmp / EXPORT_CONFIG)


def main(argv: list[str] | None = None) -> int:
    from pretrain.export import export_command

    return export_command("python -m finetune.export", __doc__.split("\n\n")[0], export, argv)


if __name__ == "__main__":
    sys.exit(main())
