"""Tests of compactify.heal: packing and sharding, a real 2-process gloo FSDP2 healing run under
torchrun, exact resume after a stop, half-written checkpoints, and refused bad input.

The model is a tiny random Llama (hidden 64, 2 blocks) with a 300-token byte-level BPE
tokenizer trained here on synthetic sentences, so the tests need no download and run fast.
The distributed runs heal its tensorized version (``compactify.tensorize``: q, k, v, o, gate,
up as 3-core MPOs at half their parameters, down left dense), saved and loaded like the
study's compressed models.
"""
from __future__ import annotations

import copy
import io
import math
import os
import random
from pathlib import Path

import pytest
import torch

from compactify.config import load_config
from compactify.heal import HealConfig, check_nproc, launch, lr_at, select_trainable
from compactify.heal_data import (HealError, ShardedSampler, check_resume, find_checkpoint, pack_tokens,
                                  plan_steps)
from compactify.results import read_json
from conftest import tiny_llama

NOUNS = "river town teacher window garden letter doctor market winter child road song".split()
VERBS = "sees finds opens carries follows writes paints remembers".split()
ADJS = "old quiet bright small green distant early warm".split()


def synthetic_text(n_docs: int = 60, seed: int = 0) -> str:
    """Documents of simple sentences from a tiny grammar: learnable, so the loss must fall."""
    rnd = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [f"The {rnd.choice(ADJS)} {rnd.choice(NOUNS)} {rnd.choice(VERBS)} the {rnd.choice(NOUNS)}."
                 for _ in range(rnd.randint(3, 8))]
        docs.append(" ".join(sents))
    return "\n\n".join(docs) + "\n"


def make_tiny_model(path: Path, layers: int = 2, seed: int = 0) -> Path:
    """A random LlamaForCausalLM + byte-level BPE tokenizer, saved like any HF model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([synthetic_text(200, seed=1)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")
    tiny_llama(seed, vocab_size=len(tok), intermediate_size=128, num_hidden_layers=layers, max_position_embeddings=128,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def heal_cfg(text: Path, **heal) -> dict:
    """Tiny, fast healing settings: 32-token rows, 2 rows per rank, a high lr so the loss moves."""
    over = {"heal.data": str(text), "heal.seq_len": 32, "heal.batch_per_rank": 2, "heal.steps": 6,
            "heal.checkpoint_every": 2, "heal.keep_checkpoints": 2, "heal.lr": 1e-2, "heal.warmup": 0.2,
            "device": "cpu", "seed": 0}
    over.update({f"heal.{k}": v for k, v in heal.items()})
    return load_config(None, over)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    model = make_tiny_model(root / "tiny")
    text = root / "text.txt"
    text.write_text(synthetic_text(80))
    return root, model, text


@pytest.fixture(scope="module")
def tiny_mpo(tiny):
    """The tiny model tensorized and saved with save_pretrained, as the compression step does."""
    from compactify.models import load_model, save_model_dir
    from compactify.tensorize import WITHOUT_DOWN, Plan, tensorize

    model, tok = load_model(tiny[1])
    tensorize(model, Plan.uniform(2, target_ratio=0.5, matrices=WITHOUT_DOWN))
    return save_model_dir(model, tok, tiny[0] / "tiny_mpo")


@pytest.fixture(scope="module")
def uninterrupted(tiny, tiny_mpo):
    """The smoke run: 6 steps of real 2-process gloo FSDP2 healing of the MPO model under torchrun."""
    root, _, text = tiny
    result = launch(tiny_mpo, root / "full", heal_cfg(text, activation_checkpointing=True), nproc=2)
    return root / "full", result


# ---------------------------------------------------------------- data
def test_pack_tokens_is_a_seeded_permutation_of_full_rows():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]  # 11 tokens -> 2 rows of 5, one token dropped
    a, b = pack_tokens(docs, 5, seed=0), pack_tokens(docs, 5, seed=0)
    assert a.shape == (2, 5) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert sorted(map(tuple, a.tolist())) == [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)]
    rows = pack_tokens([list(range(1000))], 10, seed=0)
    assert not torch.equal(rows, torch.arange(1000).view(100, 10))  # shuffled
    assert not torch.equal(rows, pack_tokens([list(range(1000))], 10, seed=1))
    with pytest.raises(HealError, match="fewer than one sequence"):
        pack_tokens(docs, 64, seed=0)


def test_sampler_shards_disjointly_covers_an_epoch_and_resumes():
    n, b, world = 23, 2, 3  # 3 steps per epoch of 6 rows; 5 rows of the ragged end dropped
    samplers = [ShardedSampler(n, b, world, r, seed=0) for r in range(world)]
    epoch0 = [torch.cat([s.indices(step) for s in samplers]) for step in range(3)]
    seen = torch.cat(epoch0)
    assert len(set(seen.tolist())) == 18 and all(len(s.indices(0)) == b for s in samplers)
    assert not torch.equal(samplers[0].indices(3), samplers[0].indices(0))  # epoch 1 reshuffled
    data = torch.arange(n * 4).view(n, 4)
    s = samplers[1]
    first = [s.next_batch(data) for _ in range(4)]
    resumed = ShardedSampler(n, b, world, 1, seed=0)
    resumed.load_state_dict({**s.state_dict(), "position": 2})
    assert torch.equal(resumed.next_batch(data), first[2]) and resumed.position == 3
    with pytest.raises(HealError, match="world_size"):
        ShardedSampler(n, b, 2, 1, seed=0).load_state_dict(s.state_dict())


def test_token_budget_larger_than_the_corpus_is_refused_unless_epochs_allowed():
    plan = plan_steps(n_seq=100, seq_len=32, world_size=2, batch_per_rank=2, tokens=2000, steps=None, max_epochs=1)
    assert plan["steps"] == 16 and plan["tokens"] == 16 * 128 and plan["epochs"] == pytest.approx(16 / 25)
    with pytest.raises(HealError, match=r"2\.00 passes.*heal.max_epochs"):
        plan_steps(100, 32, 2, 2, tokens=50 * 128, steps=None, max_epochs=1)
    assert plan_steps(100, 32, 2, 2, tokens=50 * 128, steps=None, max_epochs=2)["epochs"] == 2
    assert plan_steps(100, 32, 2, 2, tokens=10**9, steps=5, max_epochs=1)["steps"] == 5  # steps win
    with pytest.raises(HealError, match="fewer than one global batch"):
        plan_steps(3, 32, 2, 2, tokens=100, steps=None, max_epochs=1)


def test_heldout_text_is_never_used_for_healing(tiny):
    from compactify import corpus
    from compactify.heal_data import load_documents

    with pytest.raises(HealError, match="heldout"):
        load_documents("heldout")
    docs = load_documents(str(tiny[2]))
    assert len(docs) == 80 and all(d.startswith("The ") for d in docs)
    heal, heldout = load_documents("heal"), corpus.documents("heldout")
    assert len(heal) > 400 and not set(heal) & set(heldout)


def test_lr_warms_up_then_decays_to_the_floor():
    hc = HealConfig.from_cfg(load_config(None, {"heal.lr": 1.0, "heal.warmup": 0.1, "heal.min_lr_ratio": 0.1}))
    lrs = [lr_at(s, 100, hc) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


# ---------------------------------------------------------------- trainable parameters
def test_select_trainable_by_group_on_a_model_with_mpo_layers(tiny):
    from compactify.models import load_model
    from compactify.mpo import MPOLinear

    model, _ = load_model(tiny[1])
    block = model.model.layers[0]
    block.self_attn.q_proj = MPOLinear.from_linear(block.self_attn.q_proj, chi=4, cores=3)
    default = select_trainable(model, ["mpo", "dense", "norms"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.cores.0" in trained and "model.layers.1.mlp.down_proj.weight" in trained
    assert "model.layers.0.input_layernorm.weight" in trained and "model.norm.weight" in trained
    assert "model.embed_tokens.weight" not in trained  # tied with lm_head: neither trains
    select_trainable(model, ["mpo"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.0.self_attn.q_proj.cores.{k}" for k in range(3)}
    everything = select_trainable(model, ["all"])
    assert everything["trainable"] == everything["total"] > default["trainable"]
    dense, _ = load_model(tiny[1])
    with pytest.raises(HealError, match="selects no parameters"):
        select_trainable(dense, ["mpo"])
    with pytest.raises(HealError, match="heal.trainable"):
        HealConfig.from_cfg(load_config(None, {"heal.trainable": ["cores"]}))


# ---------------------------------------------------------------- real distributed runs
def test_two_process_gloo_fsdp2_smoke_run(tiny_mpo, uninterrupted):
    from compactify.models import load_model
    from compactify.mpo import MPOLinear

    out, r = uninterrupted
    assert r["completed"] and r["world_size"] == 2 and r["backend"] == "gloo" and r["strategy"] == "fsdp2"
    curve = r["loss_curve"]
    assert [c["step"] for c in curve] == [1, 2, 3, 4, 5, 6] and curve[-1]["tokens"] == 6 * 2 * 2 * 32
    assert all(torch.isfinite(torch.tensor(c["loss"])) for c in curve)
    assert r["final_loss"] < r["first_loss"] - 0.1  # it learns the synthetic grammar
    assert r["tokens_per_s"] > 0 and len(r["peak_rss_mib_per_rank"]) == 2 and min(r["peak_rss_mib_per_rank"]) > 50
    assert r["meta"]["config"]["heal"]["strategy"] == "fsdp2" and r["meta"]["git_commit"] is not None
    # checkpoints: the last two complete ones kept, no temporary leftovers
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_6"]
    assert (out / "checkpoints" / "step_6" / "COMPLETE").is_file()
    assert r["params"]["trainable"] < r["params"]["total"]
    # the healed model loads as a compressed model; cores and dense down_proj changed, the embedding did not
    before, _ = load_model(tiny_mpo)
    after, tok = load_model(out / "model")
    assert tok.eos_token == "</s>" and isinstance(after.model.layers[1].mlp.up_proj, MPOLinear)
    assert sum(p.numel() for p in after.parameters()) == r["params"]["total"]
    assert torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)
    for name in ("mlp.up_proj.cores.1", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert not torch.allclose(before.model.layers[1].get_parameter(name), after.model.layers[1].get_parameter(name))


def test_resume_after_a_stop_reproduces_the_uninterrupted_loss_curve(tiny, tiny_mpo, uninterrupted):
    root, _, text = tiny
    out = root / "resumed"
    stopped = launch(tiny_mpo, out, heal_cfg(text, stop_after=3, activation_checkpointing=False), nproc=2)
    assert stopped == {"completed": False, "out_dir": str(out)}
    assert not (out / "heal.json").exists() and not (out / "model").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    # half-written checkpoints, as a kill during a save leaves them: newer, but no COMPLETE marker
    (out / "checkpoints" / "step_5").mkdir()
    (out / "checkpoints" / "step_5" / ".metadata").write_bytes(b"garbage")
    (out / "checkpoints" / ".step_4.tmp").mkdir()
    assert find_checkpoint(out / "checkpoints")[0].name == "step_2"
    log = io.StringIO()
    # resumed with activation checkpointing, as after running out of memory: same numbers, less memory
    resumed = launch(tiny_mpo, out, heal_cfg(text, activation_checkpointing=True), nproc=2, stream=log)
    assert "ignoring incomplete checkpoint" in log.getvalue() and "step_5" in log.getvalue()
    assert resumed["resumed_from_step"] == 2 and resumed["steps_this_run"] == 4
    full = uninterrupted[1]["loss_curve"]
    assert [c["step"] for c in resumed["loss_curve"]] == [c["step"] for c in full]
    for a, b in zip(full, resumed["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["lr"] == b["lr"]


def test_heldout_perplexity_is_tracked_through_a_resume_and_scores_the_exported_model(tiny, tiny_mpo):
    """heal.eval_every: held-out perplexity at step 0, every N steps and at the end, kept across a
    stop and resume; the last point is the exported model's perplexity on the same windows."""
    from compactify.evaluate import heldout_ids_for, perplexity
    from compactify.models import load_model

    root, _, text = tiny
    cfg = heal_cfg(text, eval_every=4, checkpoint_every=2)
    cfg["eval"]["perplexity"].update(texts=["brown-heldout"], seq_len=32, max_tokens=320, batch_size=4)
    out = root / "tracked"
    cfg["heal"]["stop_after"] = 3
    assert launch(tiny_mpo, out, cfg, nproc=2)["completed"] is False
    cfg["heal"]["stop_after"] = None
    r = launch(tiny_mpo, out, cfg, nproc=2)
    points = r["heldout_curve"]
    assert [p["step"] for p in points] == [0, 4, 6] and [p["tokens"] for p in points] == [0, 4 * 4 * 32, 6 * 4 * 32]
    first, last = (p["perplexity"]["brown-heldout"] for p in (points[0], points[-1]))
    assert first["tokens"] == last["tokens"] == 10 * 31 and first["ids_sha"] == last["ids_sha"]
    assert last["ppl"] != first["ppl"]
    model, tok = load_model(out / "model")
    again = perplexity(model, tok, heldout_ids_for(tok, cfg)["brown-heldout"], seq_len=32, batch_size=4,
                       autocast=cfg["eval"]["autocast"])
    assert abs(again["nll"] - last["nll"]) < 2e-2


def test_long_run_reports_each_point_against_the_dense_model_on_the_same_windows(tiny, tiny_mpo):
    """heal_study.long_run (make heal-long): points every ~N tokens, each as a ratio to the dense
    model's perplexity, and the last one paired with it."""
    from compactify.evaluate import heldout_ids_for, perplexity
    from compactify.heal_study import long_run
    from compactify.models import load_model

    root, model, text = tiny
    cfg = heal_cfg(text, steps=None, nproc=1)
    cfg["eval"]["perplexity"].update(texts=["brown-heldout"], seq_len=32, max_tokens=320, batch_size=4)
    dense, tok = load_model(model)
    base = {"brown-heldout": perplexity(dense, tok, heldout_ids_for(tok, cfg)["brown-heldout"], seq_len=32,
                                        batch_size=4, autocast=cfg["eval"]["autocast"], text_name="brown-heldout")}
    r = long_run(tiny_mpo, root / "long", cfg, tokens=6 * 64, eval_every_tokens=128, baseline=base,
                 stream=io.StringIO())
    assert r["eval_every_steps"] == 2 and [p["tokens"] for p in r["points"]] == [0, 128, 256, 384]
    for p in r["points"]:
        assert p["x_dense"]["brown-heldout"] == pytest.approx(p["perplexity"]["brown-heldout"]["ppl"] / base["brown-heldout"]["ppl"])
    final = r["final_vs_dense"]["brown-heldout"]
    assert final["ppl_b"] == pytest.approx(r["points"][-1]["perplexity"]["brown-heldout"]["ppl"])
    assert final["ppl_ratio_lo"] <= final["ppl_ratio"] <= final["ppl_ratio_hi"]
    assert r["tokens"] == 384 and len(r["heal"]["curve"]) == 6 and r["lr"] == cfg["heal"]["lr"]

    # two long runs paired at every common point: a run against itself differs by exactly 0; a
    # shifted copy by its shift; a run written without per-window NLL is refused, not guessed
    from compactify.compare import PairingError
    from compactify.heal_study import paired_long_runs

    same = paired_long_runs(r, r)
    assert [p["tokens"] for p in same] == [0, 128, 256, 384]
    assert all(p["brown-heldout"]["ppl_ratio"] == pytest.approx(1.0) for p in same)
    shifted = copy.deepcopy(r)
    shifted["points"] = shifted["points"][1:]  # only the common points are paired
    for p in shifted["points"]:
        p["perplexity"]["brown-heldout"]["window_nll"] = [x - 0.1 for x in p["perplexity"]["brown-heldout"]["window_nll"]]
    pairs = paired_long_runs(r, shifted)
    assert [p["tokens"] for p in pairs] == [128, 256, 384]
    assert all(p["brown-heldout"]["ppl_ratio"] == pytest.approx(math.exp(-0.1)) for p in pairs)
    for p in shifted["points"]:
        del p["perplexity"]["brown-heldout"]["window_nll"]
    with pytest.raises(PairingError, match="no per-window NLL"):
        paired_long_runs(r, shifted)

    # the first part of the same run (a recipe check): stopped at the last checkpoint at or before
    # the tokens asked for (step 4 of 6), its points (the last at that checkpoint) equal to the full run's
    part = long_run(tiny_mpo, root / "long_part", cfg, tokens=6 * 64, eval_every_tokens=128, baseline=base,
                    stream=io.StringIO(), stop_after_tokens=5 * 64)
    assert part["completed"] is False and part["stopped_at_tokens"] == 256
    assert [p["tokens"] for p in part["points"]] == [0, 128, 256] and len(part["heal"]["curve"]) == 4
    for a, b in zip(part["points"], r["points"]):
        assert a["perplexity"]["brown-heldout"]["nll"] == pytest.approx(b["perplexity"]["brown-heldout"]["nll"], abs=1e-4)
    assert [c["lm_loss"] for c in part["heal"]["curve"]] == pytest.approx([c["lm_loss"] for c in r["heal"]["curve"][:4]])
    with pytest.raises(ValueError, match="before the first checkpoint"):
        long_run(tiny_mpo, root / "long_early", cfg, tokens=6 * 64, eval_every_tokens=128, baseline=base,
                 stop_after_tokens=3 * 64)

    # the checkpoints the run kept (steps 4 and 6), exported as model directories for the benchmarks
    # along the run: the last holds exactly the healed model's weights, the middle one other weights
    from compactify.heal_data import export_checkpoint
    from compactify.heal_study import export_checkpoints

    exports = export_checkpoints(tiny_mpo, root / "long", tokens_per_step=64)
    assert sorted(exports) == [256, 384] and exports[384].endswith("at_384")
    healed = load_model(root / "long" / "model")[0].state_dict()
    last, middle = (load_model(exports[t])[0].state_dict() for t in (384, 256))
    assert healed.keys() == last.keys() == middle.keys()
    assert all(torch.equal(healed[k], last[k]) for k in healed)
    assert any(not torch.equal(healed[k], middle[k]) for k in healed)
    stamp = (Path(exports[256]) / "config.json").stat().st_mtime_ns
    assert export_checkpoints(tiny_mpo, root / "long", tokens_per_step=64) == exports  # kept, not rewritten
    assert (Path(exports[256]) / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(HealError, match="not a complete healing checkpoint"):
        export_checkpoint(tiny_mpo, root / "long", root / "nowhere")


# ---------------------------------------------------------------- bad input, in this process (world of one)
def test_resume_dir_from_a_different_model_or_plan_is_refused(tiny, uninterrupted):
    from compactify.heal import train

    root, model, text = tiny
    with pytest.raises(HealError, match=r"different model or plan.*model:.*world_size: 2 in the checkpoint vs 1"):
        train(model, uninterrupted[0], heal_cfg(text))  # the dense original of the healed MPO model
    saved = read_json(uninterrupted[0] / "checkpoints" / "step_6" / "meta.json")["fingerprint"]
    check_resume(saved, dict(saved), uninterrupted[0])  # the same plan resumes
    with pytest.raises(HealError, match="lr: 0.003 in the checkpoint vs 0.001"):
        check_resume(saved | {"lr": 0.003}, saved | {"lr": 0.001}, uninterrupted[0])


def test_more_processes_than_cores_is_refused_before_starting(tiny, tmp_path):
    n = len(os.sched_getaffinity(0))
    with pytest.raises(HealError, match=f"{n + 1} processes asked for but this machine has {n} CPU cores"):
        launch(tiny[1], tmp_path / "x", heal_cfg(tiny[2]), nproc=n + 1)
    assert not (tmp_path / "x").exists()
    check_nproc(n, torch.device("cpu"))  # exactly the cores is fine


def test_budget_beyond_the_corpus_fails_in_train_with_a_clear_error(tiny, tmp_path):
    from compactify.heal import train

    with pytest.raises(HealError, match="more than heal.max_epochs"):
        train(tiny[1], tmp_path / "big", heal_cfg(tiny[2], steps=None, tokens=10**7))


def test_ddp_strategy_in_a_world_of_one(tiny, tmp_path):
    """DDP instead of FSDP2, and train() called directly (no torchrun): a world of one."""
    from compactify.heal import train

    r = train(tiny[1], tmp_path / "ddp", heal_cfg(tiny[2], strategy="ddp", steps=3, checkpoint_every=10))
    assert r["strategy"] == "ddp" and r["world_size"] == 1 and len(r["loss_curve"]) == 3
    assert (tmp_path / "ddp" / "checkpoints" / "step_3" / "COMPLETE").is_file() and r["final_checkpoint_kept"]
    assert read_json(tmp_path / "ddp" / "heal.json")["final_loss"] == r["final_loss"]


def test_command_line_entry_point_with_overrides_and_its_error_line(tiny, tmp_path, capsys):
    """`python -m compactify.heal --set ...` (here in-process, a world of one) and a bad value."""
    from compactify.heal import main

    sets = [f"heal.data={tiny[2]}", "heal.seq_len=32", "heal.batch_per_rank=2", "heal.steps=2", "device=cpu"]
    main(["--model-dir", str(tiny[1]), "--out-dir", str(tmp_path / "cli")] + sum((["--set", s] for s in sets), [])
         + ["--set", "heal.keep_final_checkpoint=false"])
    r = read_json(tmp_path / "cli" / "heal.json")
    assert r["plan"]["steps"] == 2 and r["meta"]["config"]["heal"]["seq_len"] == 32
    # keep_final_checkpoint=false: the checkpoints go once the model and heal.json are written
    assert not r["final_checkpoint_kept"] and not (tmp_path / "cli" / "checkpoints").exists()
    assert (tmp_path / "cli" / "model").is_dir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-dir", str(tiny[1]), "--out-dir", str(tmp_path / "bad"), "--set", "heal.strategy=zero3"])
    assert exit_info.value.code == 2
    assert "heal: rank 0 failed: HealError: heal.strategy 'zero3'" in capsys.readouterr().err
    err = read_json(tmp_path / "bad" / "errors" / "rank0.json")
    assert err["bad_input"] and err["type"] == "HealError" and "heal.strategy 'zero3'" in err["message"]


def test_an_error_in_the_ranks_comes_back_from_launch_as_bad_input_or_a_runtime_error(tiny, tiny_mpo, uninterrupted,
                                                                                        tmp_path):
    """Each failing rank writes its error to out_dir/errors; launch raises the first one: bad input
    (here a healing text shorter than one sequence) as HealError, anything else (here a checkpoint
    marked complete whose tensor index is garbage) as RuntimeError naming the rank."""
    import shutil

    _, model, text = tiny
    short = tmp_path / "short.txt"
    short.write_text("The old river sees the town.\n")
    with pytest.raises(HealError, match="fewer than one sequence"):
        launch(model, tmp_path / "short", heal_cfg(short), nproc=2)
    out = tmp_path / "corrupt"
    shutil.copytree(uninterrupted[0] / "checkpoints" / "step_6", out / "checkpoints" / "step_6")
    (out / "checkpoints" / "step_6" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"healing failed \(torchrun exit code 1\): rank \d: \w+"):
        launch(tiny_mpo, out, heal_cfg(text, activation_checkpointing=True), nproc=2, stream=io.StringIO())


# ---------------------------------------------------------------- distillation (heal.loss = kd | mix)
def test_kd_loss_is_zero_for_the_teacher_itself_and_topk_approximates_it():
    from compactify.distill import kd_loss

    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    full = kd_loss(s, t)
    assert full.item() > 0
    v, i = t.topk(50, dim=-1)  # all 50 "top" logits: exactly the full KL
    assert kd_loss(s, topk=(v, i)).item() == pytest.approx(full.item(), rel=1e-5)
    v, i = t.topk(10, dim=-1)
    assert 0 < kd_loss(s, topk=(v, i)).item()
    assert kd_loss(s, t, temperature=2.0).item() != pytest.approx(full.item())


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused():
    from types import SimpleNamespace

    from compactify.distill import HealError, check_teacher

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    student, tok = SimpleNamespace(config=SimpleNamespace(vocab_size=3)), Tok({"a": 0, "b": 1, "c": 2})
    check_teacher(student, tok, student, Tok({"a": 0, "b": 1, "c": 2}), "'same'")
    with pytest.raises(HealError, match="vocabulary of 4 tokens, the student 3.*heal.loss=lm"):
        check_teacher(student, tok, SimpleNamespace(config=SimpleNamespace(vocab_size=4)), tok, "'big'")
    with pytest.raises(HealError, match="different ids"):
        check_teacher(student, tok, student, Tok({"a": 0, "c": 1, "b": 2}), "'other'")
    with pytest.raises(HealError, match="heal.loss 'distil' is not one of lm, kd, mix"):
        HealConfig.from_cfg(load_config(None, {"heal.loss": "distil"}))


@pytest.fixture(scope="module")
def kd_uninterrupted(tiny, tiny_mpo):
    root, model, text = tiny
    cfg = heal_cfg(text, loss="kd", teacher=str(model), kd_temperature=2.0)
    return root / "kd_full", launch(tiny_mpo, root / "kd_full", cfg, nproc=2)


def test_two_process_kd_run_logs_both_losses_and_resumes_exactly(tiny, tiny_mpo, kd_uninterrupted):
    root, model, text = tiny
    r = kd_uninterrupted[1]
    assert r["completed"] and r["loss"] == "kd" and r["teacher"]["mode"] == "online" and r["world_size"] == 2
    curve = r["loss_curve"]
    assert all(c["kd_loss"] is not None and c["lm_loss"] is not None and c["loss"] == c["kd_loss"] for c in curve)
    assert curve[-1]["kd_loss"] < curve[0]["kd_loss"]  # the student moves towards its teacher
    out = root / "kd_resumed"
    cfg = heal_cfg(text, loss="kd", teacher=str(model), kd_temperature=2.0)
    assert launch(tiny_mpo, out, {**cfg, "heal": {**cfg["heal"], "stop_after": 3}}, nproc=2)["completed"] is False
    resumed = launch(tiny_mpo, out, cfg, nproc=2)
    assert resumed["resumed_from_step"] == 2
    for a, b in zip(curve, resumed["loss_curve"]):
        assert abs(a["kd_loss"] - b["kd_loss"]) <= 1e-6 and abs(a["lm_loss"] - b["lm_loss"]) <= 1e-6


def test_topk_teacher_mode_writes_its_file_once_and_refuses_one_for_other_data(tiny, tiny_mpo, tmp_path):
    from compactify.distill import HealError
    from compactify.heal import train

    root, model, text = tiny
    cfg = heal_cfg(text, loss="mix", teacher=str(model), teacher_mode="topk", teacher_topk=8, steps=3,
                   checkpoint_every=10)
    r = train(tiny_mpo, tmp_path / "topk", cfg)
    assert r["teacher"] == {"model": str(model), "mode": "topk", "temperature": 1.0, "topk": 8}
    assert (tmp_path / "topk" / "teacher_top8.pt").is_file()
    c = r["loss_curve"][0]
    assert c["loss"] == pytest.approx(0.5 * c["lm_loss"] + 0.5 * c["kd_loss"], rel=1e-5)
    other = tmp_path / "other.txt"
    other.write_text(synthetic_text(80, seed=7))
    bad = heal_cfg(other, loss="kd", teacher=str(model), teacher_mode="topk", teacher_topk=8, steps=3,
                   teacher_file=str(tmp_path / "topk" / "teacher_top8.pt"))
    with pytest.raises(HealError, match="made for other healing data"):
        train(tiny_mpo, tmp_path / "bad", bad)


def test_launch_forwards_whole_lines_and_throttles_progress_bar_refreshes():
    from compactify.progress import ThrottledLines

    out = io.StringIO()
    shown = ThrottledLines(out, every=3600)
    for pct in range(0, 101, 10):  # a tqdm bar refreshing one line with carriage returns
        shown.write(f"\rheal: {pct}%")
    shown.write("\nheal: saved checkpoint step_2\nheal: rank 1 failed: boom\n")
    shown.flush()
    assert out.getvalue() == "heal: 0%\nheal: 100%\nheal: saved checkpoint step_2\nheal: rank 1 failed: boom\n"


def sweep_setup(tiny, tiny_mpo):
    """heal_study's comparisons on the tiny MPO model: healing settings for a budget in tokens, the
    start loaded, and a small held-out text of the same synthetic grammar."""
    from compactify.models import load_model

    cfg = heal_cfg(tiny[2], steps=None)
    cfg["eval"]["perplexity"].update(seq_len=32, batch_size=4)
    cfg["eval"]["autocast"] = None
    model, tok = load_model(tiny_mpo)
    return cfg, model, tok, {"synthetic": torch.tensor(tok(synthetic_text(12, seed=7)).input_ids)}


def test_lr_sweep_heals_once_per_rate_from_the_same_start_and_names_the_best(tiny, tiny_mpo, tmp_path):
    """notebook 05's learning-rate sweep: one fresh healing per rate, same tokens, paired against the
    first rate; a rate too small to move the weights must lose to one that learns the grammar."""
    from compactify import heal_study

    cfg, _, _, heldout = sweep_setup(tiny, tiny_mpo)
    r = heal_study.lr_sweep(tiny_mpo, tmp_path / "sweep", cfg, [1e-7, 1e-2], tokens=6 * 2 * 32, heldout=heldout)
    assert set(r["lrs"]) == {"1e-07", "0.01"} and r["tokens"] == 384 and r["judged_on"] == "synthetic"
    assert all(v["settings"] == {"heal.lr": float(k)} and len(v["curve"]) == 6 for k, v in r["lrs"].items())
    assert r["best"] == 0.01
    paired = r["paired_vs_first"]["0.01"]["synthetic"]
    assert paired["diff"] < 0 and paired["hi"] < 0     # the learning rate that learns is better on the same windows
    assert not any((tmp_path / "sweep").iterdir())       # only the numbers are kept
    with pytest.raises(ValueError, match="at least one learning rate"):
        heal_study.lr_sweep(tiny_mpo, tmp_path / "none", cfg, [], tokens=64)


def test_variant_comparison_can_keep_the_models_and_pair_them_with_a_separate_run(tiny, tiny_mpo, tmp_path):
    """scripts/loss_study.py: the healed models stay (for benchmarks scored later) without their
    checkpoints, and each is paired with another healing run of the same start by its results JSON."""
    from compactify import heal_study
    from compactify.perplexity import heldout_perplexities
    from compactify.results import write_json

    cfg, model, tok, heldout = sweep_setup(tiny, tiny_mpo)
    r = heal_study.variant_comparison(tiny_mpo, tmp_path / "v", cfg, {"lr 1e-2": {"heal.lr": 1e-2}}, tokens=6 * 2 * 32,
                                      heldout=heldout, keep_models=True)
    kept = Path(r["variants"]["lr 1e-2"]["model_dir"])
    assert (kept / "model.safetensors").exists() and not (kept.parent / "checkpoints").exists()
    # the "separate run": the unhealed start, scored on the same windows, in notebook 05's JSON layout
    ppl = heldout_perplexities(model, tok, heldout, cfg)
    fake = {"heal": {"meta": {"config": {"heal": cfg["heal"]}}, "plan": {"tokens": 0}},
            "after": {"perplexity_texts": ppl}}
    write_json(tmp_path / "05_heal.json", fake)
    p = heal_study.paired_with_run(tmp_path / "05_heal.json", r["variants"])
    assert p["reference"].startswith("notebook 05 (lm loss, batch 2 x 32")
    q = p["by_variant"]["lr 1e-2"]["synthetic"]
    assert q["diff"] < 0 and q["hi"] < 0 and q["ppl_ratio"] < 1   # healed beats the unhealed start, paired
