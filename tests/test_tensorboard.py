"""TensorBoard: TensorBoard's own reader finds every tag README.md documents in its Outputs section.

The documented tags are read from README.md (backticked `prefix/name` tokens of the Outputs section), so
a tag documented later is checked too. Placeholders expand over the run: `<domain>` to its domains,
`layerN` to its MoE layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from parity import BASE

from moe_train.config import load_config
from moe_train.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def documented_tags(readme: str) -> list[str]:
    """Backticked `prefix/name` tokens of the README's Outputs section."""
    match = re.search(r"^### Outputs\n(.*?)(?=^##)", readme, flags=re.S | re.M)
    assert match is not None, "README.md has no '### Outputs' section"
    return sorted({tag for tag in re.findall(r"`([^`\s]+)`", match.group(1)) if re.fullmatch(r"[a-z_]+/[^/]+", tag)})


def expand(tag: str, domains: list[str], moe_layers: int) -> list[str]:
    if "<domain>" in tag:
        return [tag.replace("<domain>", d) for d in domains]
    if "layerN" in tag:
        return [tag.replace("layerN", f"layer{i}") for i in range(moe_layers)]
    assert "<" not in tag, f"README tag {tag} has a placeholder this test does not know"
    return [tag]


def test_readme_tag_parser() -> None:
    text = "### Outputs\n`metrics.jsonl` `tb/` `train/loss` and `val/<domain>`; `runs/` `a b/c`\n## Next\n`x/y`\n"
    assert documented_tags(text) == ["train/loss", "val/<domain>"]


def test_tensorboard_reader_finds_every_documented_tag(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = documented_tags((REPO / "README.md").read_text())
    assert {"train/loss", "train/lbl", "val/<domain>", "expert_load/layerN_max_over_mean"} <= set(tags)
    cfg = load_config(
        None, [*BASE, "log.tensorboard=true", "train.max_steps=2", "train.eval_every=2", f"run.dir={tmp_path}"]
    )
    Trainer(cfg).fit()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    reader = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    reader.Reload()
    found = set(reader.Tags()["scalars"]) | set(reader.Tags()["histograms"])
    moe_layers = cfg.model.num_layers - cfg.moe.first_k_dense
    wanted = [t for tag in tags for t in expand(tag, ["mock"], moe_layers)]
    assert [t for t in wanted if t not in found] == []
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    written = [(e.step, e.value) for e in reader.Scalars("train/loss")]
    assert written == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r]
