"""A Hugging Face id found in the local Hub cache loads, whether its weights are safetensors or
only PyTorch .bin files (older repositories publish those only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.generator.loader import LoadSpec, load

REPO = "tiny-org/tiny-gpt2"


def cache_snapshot(cache: Path, safe_serialization: bool) -> None:
    """A tiny random GPT-2 in the Hub cache layout (refs/main -> snapshots/<revision>)."""
    revision = "0" * 40
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(snapshot)
    if not safe_serialization:
        # transformers writes safetensors only now; an older repository's file, by hand.
        (snapshot / "model.safetensors").unlink()
        torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<unk>": 26}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>"
    )
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin-only"])
def test_a_cached_hub_model_loads_with_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, safe_serialization: bool
) -> None:
    cache_snapshot(tmp_path, safe_serialization)
    assert any(tmp_path.rglob("*.bin")) != safe_serialization
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = load(LoadSpec(model=REPO, backend="torch", dtype="float32", device="cpu"))
    logits, _ = loaded.runner.prefill([[1, 2, 3]])
    snapshot = next(tmp_path.glob("models--*/snapshots/*"))
    reference = GPT2LMHeadModel.from_pretrained(snapshot).eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        expected = reference(torch.tensor([[1, 2, 3]])).logits[:, -1]
    # The weights themselves loaded, not a freshly initialized model of the same config.
    assert torch.allclose(logits, expected, atol=1e-5)
