"""A learned identifier (pivotal tuning): new tokens with a trained embedding, saved as a
textual-inversion file that diffusers' own loader reads (issue: beyond the recipe, item 1)."""

import pytest
import torch

from conftest import tiny_config
from dreambooth_lab import identifier


def test_token_names_and_expansion_follow_diffusers():
    assert identifier.placeholder("sks") == "<sks>" and identifier.placeholder("<x>") == "<x>"
    assert identifier.token_names("<sks>", 3) == ["<sks>", "<sks>_1", "<sks>_2"]
    assert identifier.expand("a <sks> dog", "<sks>", 2) == "a <sks> <sks>_1 dog"
    assert identifier.expand("a <sks> dog", "<sks>", 1) == "a <sks> dog"


def test_learned_embedding_looks_up_old_rows_unchanged_and_new_rows_from_its_table():
    base = torch.nn.Embedding(10, 4)
    module = identifier.LearnedEmbedding(base, torch.full((2, 4), 7.0))
    out = module(torch.tensor([[1, 10, 11, 3]]))
    assert torch.equal(out[0, 0], base.weight[1]) and torch.equal(out[0, 3], base.weight[3])
    assert torch.all(out[0, 1:3] == 7.0) and module.num_embeddings == 12 and module.weight.shape == (12, 4)


def test_only_the_new_rows_learn_and_the_file_round_trips_through_diffusers(tmp_path, tiny_pipe):
    from diffusers import StableDiffusionPipeline

    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.train import train

    table_before = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = tiny_config(tmp_path, **{"identifier.learned": True, "identifier.num_vectors": 2,
                                   "identifier.embedding_only_steps": 2, "train.steps": 4, "prior.enabled": False,
                                   "identifier.lr": 1e-2})
    result = train(cfg, resume=None, progress=False)
    assert [r["lr_identifier"] for r in result.history] == [1e-2] * 4
    emb_file = result.run_dir / identifier.EMBEDDING_FILE
    from safetensors.torch import load_file

    learned = load_file(str(emb_file))[identifier.KEY]
    assert learned.shape == (2, table_before.shape[1])
    class_id = tiny_pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert not torch.equal(learned[0], table_before[class_id]), "the identifier moved from its init (the class word)"

    pipe = load_pipeline(cfg.model, device="cpu")
    load_lora(pipe, result.lora_path)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert table.shape[0] == table_before.shape[0] + 2
    assert torch.equal(table[: table_before.shape[0]], table_before), "every other row is bit-identical"
    assert torch.equal(table[-2:], learned)
    # diffusers' own loader reads the file as an ordinary embedding, and prompts expand the same way
    plain = load_pipeline(cfg.model, device="cpu")
    assert isinstance(plain, StableDiffusionPipeline)
    plain.load_textual_inversion(str(emb_file), token="<sks>")
    assert plain.maybe_convert_prompt("a <sks> dog", plain.tokenizer) == "a <sks> <sks>_1 dog"


def test_embedding_only_steps_leave_the_lora_at_its_init(tmp_path):
    from safetensors.torch import load_file

    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"identifier.learned": True, "identifier.embedding_only_steps": 3,
                                   "train.steps": 4, "train.checkpoint_every": 3, "prior.enabled": False})
    run = train(cfg, resume=None, progress=False).run_dir
    ck = load_file(str(run / "checkpoints" / "step-000003" / "lora_params.safetensors"))
    lora_b = [v for k, v in ck.items() if "lora_B" in k]
    vectors = [v for k, v in ck.items() if k.endswith("vectors")]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b), "LoRA B stays at its zero init"
    assert len(vectors) == 1
    final = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert any(torch.count_nonzero(v) > 0 for k, v in final.items() if "lora_B" in k or "lora.up" in k)


def test_a_clashing_identifier_is_refused(tiny_pipe):
    import copy

    pipe = copy.deepcopy(tiny_pipe)
    table = pipe.text_encoder.get_input_embeddings().weight
    with pytest.raises(ValueError, match="already in the tokenizer"):
        identifier.attach(pipe.text_encoder, pipe.tokenizer, "dog</w>", 1, table[:1].detach())


def test_tokens_analyze_understands_learned_tokens(tiny_pipe):
    import copy

    from dreambooth_lab.tokens import analyze

    before = analyze(["<sks>"], tiny_pipe.tokenizer)[0]
    assert before.ok and before.pieces == ["<sks>"] and "added when training starts" in before.notes[0]
    tok = copy.deepcopy(tiny_pipe.tokenizer)
    tok.add_tokens(["<sks>"])
    after = analyze(["<sks>"], tok)[0]
    assert after.ids == [len(tok) - 1] and "learned identifier" in after.notes[0]
    assert not analyze(["sks"], tok)[0].notes[0].startswith("a learned"), "a rare token is analysed as before"


def test_a_second_run_with_the_same_identifier_loads_its_own_embedding(tmp_path):
    """Two runs both named <sks>, sampled in one session (a notebook, a benchmark): the second run's
    pictures use the second run's vectors, not the first's (the loader used to skip a known token)."""
    from safetensors.torch import load_file

    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.train import train

    over = {"identifier.learned": True, "identifier.init": "random", "train.steps": 2, "prior.enabled": False}
    a = train(tiny_config(tmp_path / "a", **over, **{"train.seed": 1}), resume=None, progress=False)
    b = train(tiny_config(tmp_path / "b", **over, **{"train.seed": 2}), resume=None, progress=False)
    va, vb = (load_file(str(r.run_dir / identifier.EMBEDDING_FILE))[identifier.KEY] for r in (a, b))
    assert not torch.equal(va, vb)
    pipe = load_pipeline(tiny_config(tmp_path).model, device="cpu")
    n = len(pipe.tokenizer)
    row = lambda: pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.get_vocab()["<sks>"]]  # noqa: E731
    load_lora(pipe, a.lora_path)
    assert torch.equal(row(), va[0])
    pipe.delete_adapters("dreambooth")
    load_lora(pipe, b.lora_path)
    assert torch.equal(row(), vb[0]) and len(pipe.tokenizer) == n + 1
