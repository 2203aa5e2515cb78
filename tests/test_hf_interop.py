"""Hugging Face interop with the installed transformers and tiny random models built here (no hub).

Export: transformers loads our export and its logits equal ours (fp32, max abs <= 1e-4) for Qwen3-MoE,
Mixtral and OLMoE in both expert layouts. Import: an HF model saved by transformers itself becomes a
checkpoint whose model gives the same logits and that training starts from. Upcycling a dense Qwen3 /
Llama: the MoE's first forward equals the dense model's (twin: without renormalised top-k weights it
does not). Bad input (another architecture, a config with no HF equivalent, an existing output) is one
line on stderr, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe_train  # noqa: E402
from moe_train.cli import main  # noqa: E402
from moe_train.config import Config, load_config, to_dict  # noqa: E402
from moe_train.interop.hf import export_hf, import_hf  # noqa: E402
from moe_train.model import build_model  # noqa: E402
from moe_train.parallel.dist_checkpoint import save_distributed_checkpoint  # noqa: E402
from moe_train.parallel.groups import ProcessGroups  # noqa: E402
from moe_train.train.checkpoint import TrainState  # noqa: E402

FUSED_OK = int(transformers.__version__.split(".")[0]) >= 5
VOCAB = 97
SMALL = [
    "model.hidden_size=32",
    "model.num_layers=3",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.ffn_hidden_size=48",
    f"model.vocab_size={VOCAB}",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=24",
    "data.mock=true",
]
ARCHS = {
    "qwen3_moe": ["model.qk_norm=true", "moe.first_k_dense=1"],
    "mixtral": ["model.tie_embeddings=true"],
    "olmoe": ["model.qk_norm=true", "model.qk_norm_scope=full", "moe.norm_topk_prob=false"],
}
TOL = 1e-4


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))


def _checkpoint(tmp: Path, overrides: list[str]) -> Config:
    """A checkpoint of a model whose every parameter (norms included) is perturbed, so that any swapped
    or transposed tensor changes the logits."""
    cfg = load_config(None, [*SMALL, *overrides, f"run.dir={tmp / 'run'}", f"data.dir={tmp / 'no_data'}"])
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    save_distributed_checkpoint(cfg.run.dir, TrainState(0, 0), model, None, ProcessGroups.single(), to_dict(cfg), 1)
    return cfg


def _hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def _our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = moe_train.load_model(path)(tokens).logits_BSV
    assert out is not None
    return out


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_logits_match_transformers(tmp_path: Path, arch: str, layout: str) -> None:
    if layout == "fused" and not FUSED_OK:
        pytest.skip(f"the fused expert layout needs transformers 5.x ({transformers.__version__} installed)")
    cfg = _checkpoint(tmp_path, ARCHS[arch])
    result = export_hf(cfg.run.dir, tmp_path / "hf", expert_layout=layout)
    assert result.arch == arch and f"{layout} layout" in result.describe()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == arch
    tokens = _tokens()
    assert (_hf_logits(tmp_path / "hf", tokens) - _our_logits(Path(cfg.run.dir), tokens)).abs().max() <= TOL


def _hf_model(kind: str) -> torch.nn.Module:
    """A tiny random transformers model of `kind`, built locally."""
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    configs = {
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[0]
        ),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=8),
        "llama": lambda: transformers.LlamaConfig(**common),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind]())
    with torch.no_grad():
        for param in model.parameters():  # norms too, so that a swap would show
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_import_transformers_checkpoint_and_train_from_it(tmp_path: Path) -> None:
    from moe_train.data import build_train_source
    from moe_train.train.trainer import Trainer

    hf = _hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ckpt"
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), str(out)]) == 0
    tokens = _tokens()
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    assert (_our_logits(out, tokens) - want).abs().max() <= TOL
    # training starts from it: the first step's loss is the imported model's loss on that global batch
    overrides = [f"checkpoint.resume={out}", f"run.dir={tmp_path / 'run'}", "train.max_steps=1", "train.eval_every=0"]
    cfg = load_config(out / "config.yaml", [*overrides, "data.mock=true", "log.tensorboard=false"])
    first = Trainer(cfg).fit()[0]
    t, source, model = cfg.train, build_train_source(cfg), moe_train.load_model(out)
    losses = []
    with torch.no_grad():
        for start in range(0, t.global_batch_size, t.micro_batch_size):
            batch = source.get_batch(list(range(start, start + t.micro_batch_size)))
            token_loss = model(batch.tokens_BS, batch.labels_BS).token_loss_BS
            assert token_loss is not None
            losses.append(float(token_loss.mean()))
    assert first["lm_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_sharded_export_with_tokenizer_then_import_round_trip(tmp_path: Path) -> None:
    cfg = _checkpoint(tmp_path, ARCHS["olmoe"])
    Path(cfg.data.dir).mkdir()
    (Path(cfg.data.dir) / "tokenizer.json").write_text('{"version": "1.0"}')
    result = export_hf(cfg.run.dir, tmp_path / "hf", max_shard_bytes=40_000)
    assert len(result.files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    tokens = _tokens(3)
    ours = _our_logits(Path(cfg.run.dir), tokens)
    assert (_hf_logits(tmp_path / "hf", tokens) - ours).abs().max() <= TOL
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert torch.equal(_our_logits(tmp_path / "back", tokens), ours)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_upcycled_first_forward_equals_dense(tmp_path: Path, kind: str) -> None:
    dense = _hf_model(kind)
    dense.save_pretrained(tmp_path / "dense")
    import_hf(tmp_path / "dense", tmp_path / "moe", upcycle=(4, 2))
    model = moe_train.load_model(tmp_path / "moe")
    assert model.moe_cfg.num_experts == 4 and all(block.moe is not None for block in model.layers.values())
    tokens = _tokens(1)
    with torch.no_grad():
        want = dense(input_ids=tokens).logits
        assert (model(tokens).logits_BSV - want).abs().max() <= TOL
        # twin: without renormalised top-k weights the output is scaled by the top-k probability mass
        for block in model.layers.values():
            block.moe.router.norm_topk_prob = False
        assert (model(tokens).logits_BSV - want).abs().max() > 1e-2


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the inputs printed
    code = main(args)
    return code, capsys.readouterr().err


def test_other_architecture_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    code, err = _run_cli(["import", "--from", "hf", str(tmp_path / "gpt2"), str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "model_type ('gpt2') is not supported" in err
    assert not (tmp_path / "out").exists()
    dense = _hf_model("llama")
    dense.save_pretrained(tmp_path / "llama")
    code, err = _run_cli(["import", "--from", "hf", str(tmp_path / "llama"), str(tmp_path / "out")], capsys)
    assert code == 2 and "is a dense model: pass --upcycle-experts N" in err and err.count("\n") == 1


def test_export_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _checkpoint(tmp_path, ["model.qk_norm=true", "moe.num_shared_experts=1"])
    code, err = _run_cli(["export", "--to", "hf", cfg.run.dir, str(tmp_path / "hf")], capsys)
    assert code == 2 and err.count("\n") == 1 and "moe.num_shared_experts (1) has no Hugging Face equivalent" in err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".tmp-*"))
    qwen = _checkpoint(tmp_path / "qwen", ARCHS["qwen3_moe"])
    code, err = _run_cli(["export", "--to", "hf", qwen.run.dir, str(tmp_path / "hf"), "--arch", "mixtral"], capsys)
    assert code == 2 and "model.qk_norm (true) has no Hugging Face equivalent: MixtralForCausalLM has no qk-norm" in err
    code, err = _run_cli(["export", "--to", "hf", qwen.run.dir, str(tmp_path / "hf"), "--arch", "olmoe"], capsys)
    assert code == 2 and "model.qk_norm_scope (head) has no Hugging Face equivalent" in err
    (tmp_path / "taken").mkdir()
    code, err = _run_cli(["export", "--to", "hf", qwen.run.dir, str(tmp_path / "taken")], capsys)
    assert code == 2 and "already exists" in err and not list((tmp_path / "taken").iterdir())
    code, err = _run_cli(["export", "--to", "hf", str(tmp_path / "nothing"), str(tmp_path / "x")], capsys)
    assert code == 2 and "does not exist" in err


def test_load_model_fills_every_tensor_from_the_checkpoint_without_initialising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_model builds the model without running the initialiser (the checkpoint fills every tensor;
    the init draws cost seconds on real sizes) and its tensors equal the saved ones. Twin: build_model
    does initialise."""
    import moe_train.model.init as init
    from moe_train.parallel.dist_checkpoint import load_canonical_tensors
    from moe_train.train.checkpoint import list_checkpoints

    cfg = _checkpoint(tmp_path, ARCHS["qwen3_moe"])
    saved = load_canonical_tensors(list_checkpoints(cfg.run.dir)[-1])
    fills: list[str] = []
    fill_box = init.fill_box
    monkeypatch.setattr(init, "fill_box", lambda t, spec, *a: fills.append(spec.kind) or fill_box(t, spec, *a))
    model = moe_train.load_model(cfg.run.dir)
    assert fills == []
    state = model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[name], saved[name]) for name in saved)
    build_model(cfg)
    assert fills  # the twin: a fresh model draws its initial values
