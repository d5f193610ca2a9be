"""The briefly trained fine-grained tiny MoE (models/train_tiny.py, `init-model --train-steps`): the
corpus reader, the batches, the schedule, and a trained checkpoint that transformers and our engine
both load and agree on."""

import io
import itertools
import json
import os
import sysconfig

import pytest
import torch

from moefleet import SamplingParams
from moefleet.models.init_model import init_model
from moefleet.models.train_tiny import (
    PEAK_LR,
    learning_rate,
    next_token_loss,
    stdlib_root,
    stdlib_sources,
    train_tiny,
    training_batches,
)

STEPS = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(random, trained): the same seed, so the random checkpoint holds the trained one's starting weights."""
    root = tmp_path_factory.mktemp("tiny-fine")
    random_dir = init_model("qwen3_moe", "tiny-fine", str(root / "random"), seed=0)
    trained_dir = init_model("qwen3_moe", "tiny-fine", str(root / "trained"), seed=0, train_steps=STEPS)
    return random_dir, trained_dir


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_tiny_fine_is_fine_grained_and_its_loss_fell_on_the_first_batch(checkpoints):
    random_dir, trained_dir = checkpoints
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(trained_dir)
    assert (config.model_type, config.num_experts, config.num_experts_per_tok) == ("qwen3_moe", 32, 4)
    assert not os.path.exists(os.path.join(random_dir, "training.json"))  # train_steps=0 trains nothing
    with open(os.path.join(trained_dir, "training.json")) as f:
        report = json.load(f)
    assert report["steps"] == STEPS and report["seq_len"] == 128 and report["batch_size"] == 8
    assert report["tokens"] == STEPS * 8 * 128 and report["corpus_bytes"] > 0 and report["seconds"] > 0

    first_batch = training_batches(os.path.join(trained_dir, "tokenizer.json"), STEPS, seed=0).batches[0]
    with torch.no_grad():
        before = next_token_loss(_load(random_dir), first_batch)[1].item()
        after = next_token_loss(_load(trained_dir), first_batch)[1].item()
    assert before == pytest.approx(report["first_loss"], abs=1e-3)  # the random checkpoint is where training began
    assert after < before - 0.05, (before, after)


def test_the_engine_generates_what_transformers_generates_on_the_trained_checkpoint(checkpoints):
    from moefleet import LLM

    trained_dir = checkpoints[1]
    llm = LLM(trained_dir, num_threads=1, kv_cache_blocks=64)
    prompt = llm.get_tokenizer().encode("def read(path):\n    with open(path) as f:")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    with torch.no_grad():
        ref = _load(trained_dir).generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                          do_sample=False)
    assert out[0].outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_stdlib_sources_are_the_standard_library_in_a_seeded_order():
    first = list(itertools.islice(stdlib_sources(seed=3), 25))
    assert first == list(itertools.islice(stdlib_sources(seed=3), 25))
    assert [p for p, _ in first] != [p for p, _ in itertools.islice(stdlib_sources(seed=4), 25)]
    every = dict(stdlib_sources(seed=0))
    assert sorted(every) == sorted(p for p, _ in stdlib_sources(seed=1))  # the seed orders, never chooses
    assert stdlib_root() == sysconfig.get_paths()["stdlib"]
    for path, text in every.items():
        parts = path.split(os.sep)
        assert path.endswith(".py") and not {"site-packages", "dist-packages", "test", "tests"} & set(parts), path
    with open(json.decoder.__file__, encoding="utf-8") as f:
        assert every[os.path.join("json", "decoder.py")] == f.read()
    assert 300 < len(every) and sum(len(t) for t in every.values()) > 5_000_000  # the whole library, not a sample


def test_training_batches_are_seeded_cuts_of_the_corpus(checkpoints):
    from tokenizers import Tokenizer

    tokenizer_file = os.path.join(checkpoints[0], "tokenizer.json")
    data = training_batches(tokenizer_file, steps=2, seed=5, batch_size=4, seq_len=64)
    assert data.batches.shape == (2, 4, 64) and data.batches.dtype == torch.int64
    assert torch.equal(data.batches, training_batches(tokenizer_file, 2, seed=5, batch_size=4, seq_len=64).batches)
    assert not torch.equal(data.batches, training_batches(tokenizer_file, 2, seed=6, batch_size=4, seq_len=64).batches)
    sources = [text for _, text in itertools.islice(stdlib_sources(seed=5), data.corpus_files)]
    assert data.corpus_bytes == sum(len(t.encode("utf-8")) for t in sources)
    tokenizer = Tokenizer.from_file(tokenizer_file)
    plain = [row for row in data.batches.view(-1, 64).tolist() if min(row) >= 6]  # ids 0-5: the special tokens
    assert plain
    for row in plain:  # each sequence is a stretch of one source file, as the tokenizer reads it back
        text = tokenizer.decode(row)
        if "\ufffd" not in text:  # unless the cut split a character's bytes
            assert any(text in source for source in sources), text


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    # 100 steps: warm-up 100 // 10 = 10 steps, lr(s) = peak * (s + 1) / 10 for s < 10;
    # then cosine over steps 10..99: progress = (s - 10) / 89; lr = peak * (0.1 + 0.9 * (1 + cos(pi * p)) / 2).
    assert learning_rate(0, 100) == pytest.approx(PEAK_LR * 0.1)
    assert learning_rate(9, 100) == pytest.approx(PEAK_LR)
    assert learning_rate(10, 100) == pytest.approx(PEAK_LR)  # progress 0: cos 0 = 1
    assert learning_rate(99, 100) == pytest.approx(PEAK_LR * 0.1)  # progress 1: cos pi = -1
    assert learning_rate(10 + 89 / 2, 100) == pytest.approx(PEAK_LR * 0.55)  # halfway: cos pi/2 = 0
    assert learning_rate(0, 3) == pytest.approx(PEAK_LR)  # 3 steps: warm-up of one step


def test_training_is_deterministic_reports_progress_and_leaves_the_callers_threads(checkpoints):
    random_dir = checkpoints[0]
    tokenizer_file = os.path.join(random_dir, "tokenizer.json")
    models, progress = [_load(random_dir), _load(random_dir)], io.StringIO()
    threads = torch.get_num_threads()
    reports = [train_tiny(m, tokenizer_file, steps=2, seed=1, batch_size=2, seq_len=32, progress=progress)
               for m in models]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert not models[0].training
    assert reports[0].steps == 2 and reports[0].tokens == 2 * 2 * 32
    assert reports[0].first_loss == reports[1].first_loss and reports[0].final_loss == reports[1].final_loss
    first, second = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    untrained = _load(random_dir).state_dict()
    assert not torch.equal(first["model.embed_tokens.weight"], untrained["model.embed_tokens.weight"])
    lines = progress.getvalue().splitlines()
    assert lines[-1].startswith("step 2/2  loss ") and lines[-1].endswith("tokens/s  ETA 0s"), lines


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--train-steps must be >= 0"):
        init_model("qwen3_moe", "tiny-fine", str(tmp_path / "x"), train_steps=-1)
    with pytest.raises(ValueError, match="steps: must be >= 1"):
        training_batches("unused.json", steps=0)
    assert not os.path.exists(tmp_path / "x")
