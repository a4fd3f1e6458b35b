"""A saved compressed model loads without compactify: auto_map + generated custom code
(compactify.remote_code), in a fresh interpreter that cannot import compactify, and in lm-eval's CLI."""
from __future__ import annotations

import ast
import builtins
import glob
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import compactify.tensorize as T
from compactify import compact_model, mpo_layer, remote_code
from compactify.models import load_model, save_model_dir
from conftest import tiny_llama

# Run first in every fresh interpreter: compactify cannot be imported (not even through the
# editable install's path hook), and the repository's src/ is off sys.path.
NO_COMPACTIFY = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "compactify" or name.startswith("compactify."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
    sys.meta_path.insert(0, _Block())
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
""")


def fresh_python(code: str, *args, cwd, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    out = subprocess.run([sys.executable, "-I", "-c", NO_COMPACTIFY + textwrap.dedent(code), *map(str, args)],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture
def compressed(tmp_path, embedded):
    """A tensorized tiny Llama (real SmolLM2 tokenizer) saved with save_model_dir, and the model."""
    model = tiny_llama()
    T.tensorize(model, T.Plan.uniform(2, chi=6))
    return save_model_dir(model, embedded[1], tmp_path / "compressed"), model


def reference(model, path):
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 40 tokens: MPOLinear materializes W; 5 tokens: the factored contraction
        ref = {"ids": ids, "long": model(ids).logits, "short": model(ids[:, :5]).logits, "n": model.num_parameters(),
               "gen": model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)}
    torch.save(ref, path)
    return ref


def test_saved_directory_has_auto_map_and_the_package_source(compressed):
    path, model = compressed
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_compactify.CompactLlamaConfig",
                               "AutoModelForCausalLM": "modeling_compactify.CompactLlamaForCausalLM"}
    code = (path / remote_code.MODEL_FILE).read_text()
    for fn in (mpo_layer._plan, mpo_layer.cores_to_matrix, mpo_layer.MPOLinear.forward,
               compact_model.check_checkpoint, compact_model.compact_init, compact_model.compact_from_pretrained):
        assert inspect.getsource(fn) in code  # copied, not re-typed
    assert "def from_linear" not in code  # needs tensorly: left out
    tree = ast.parse(code)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported == {"__future__", "json", "math", "os", "struct", "time", "pathlib", "typing", "torch", "transformers"}  # every name the generated module reads is defined in it (or a builtin)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert loaded <= bound, loaded - bound


@pytest.mark.slow
def test_fresh_interpreter_without_compactify_loads_with_trust_remote_code(compressed, tmp_path):
    path, model = compressed
    ref = reference(model, tmp_path / "ref.pt")
    out = fresh_python("""
        import sys, torch
        from transformers import AutoModelForCausalLM
        path, ref = sys.argv[1], torch.load(sys.argv[2])
        try:
            AutoModelForCausalLM.from_pretrained(path)
            print("PLAIN LOADED")
        except ValueError as e:
            print("PLAIN REFUSED:", "trust_remote_code=True" in str(e))
        m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            print("LONG", torch.equal(m(ref["ids"]).logits, ref["long"]))
            print("SHORT", torch.equal(m(ref["ids"][:, :5]).logits, ref["short"]))
            print("PARAMS", m.num_parameters() == ref["n"], type(m).__name__, type(m).__module__.startswith("transformers_modules"))
            print("GENERATE", torch.equal(m.generate(ref["ids"][:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0), ref["gen"]))
        m.save_pretrained(sys.argv[3])  # a remote-code model re-saves itself with its code
        again = AutoModelForCausalLM.from_pretrained(sys.argv[3], trust_remote_code=True).eval()
        with torch.no_grad():
            print("RESAVED", torch.equal(again(ref["ids"]).logits, ref["long"]))
        print("COMPACTIFY IMPORTED", any(k.startswith("compactify") for k in sys.modules))
    """, path, tmp_path / "ref.pt", tmp_path / "resaved", cwd=tmp_path)
    lines = out.stdout
    for want in ("PLAIN REFUSED: True", "LONG True", "SHORT True", "PARAMS True CompactLlamaForCausalLM True",
                 "GENERATE True", "RESAVED True", "COMPACTIFY IMPORTED False"):
        assert want in lines, lines + out.stderr[-3000:]
    assert ref["n"] < tiny_llama().num_parameters()


def _damage(path, kind):
    st = path / "model.safetensors"
    tensors = load_file(st)
    if kind == "missing core":
        del tensors["model.layers.1.mlp.up_proj.cores.2"]
    elif kind == "extra core":
        tensors["model.layers.1.mlp.up_proj.cores.3"] = torch.zeros(1, 2, 2, 1)
    elif kind == "missing norm":
        del tensors["model.norm.weight"]
    if kind == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) - 1000])
    else:
        save_file(tensors, st, metadata={"format": "pt"})


DAMAGE = {"missing core": ["model.safetensors", "up_proj.cores.2: expected", "found nothing"],
          "extra core": ["model.safetensors", "up_proj.cores.3: an extra core"],
          "missing norm": ["compressed_missing norm", "missing: model.norm.weight"],
          "truncated": ["model.safetensors is truncated", "re-save the model"]}


@pytest.mark.slow
def test_damaged_checkpoint_fails_on_every_route(compressed, tmp_path):
    import shutil

    path, _ = compressed
    dirs = {}
    for kind in DAMAGE:
        d = dirs[kind] = tmp_path / f"compressed_{kind}"
        shutil.copytree(path, d)
        _damage(d, kind)
        for route in (lambda: load_model(d), lambda: AutoModelForCausalLM.from_pretrained(d),
                      lambda: T.load_compressed(d)):
            with pytest.raises(T.CompressedCheckpointError) as err:
                route()
            for want in DAMAGE[kind]:
                assert want in str(err.value), str(err.value)
    out = fresh_python("""
        import json, sys
        from transformers import AutoModelForCausalLM
        for d in sys.argv[1:]:
            try:
                AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
                print(json.dumps(["LOADED", d]))
            except Exception as e:
                print(json.dumps([type(e).__name__, str(e)]))
    """, *dirs.values(), cwd=tmp_path)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(results) == len(DAMAGE)
    for (kind, wants), (name, message) in zip(DAMAGE.items(), results):
        assert name == "CompressedCheckpointError", (kind, name, message)
        assert all(w in message for w in wants), (kind, message)


@pytest.mark.slow
def test_lm_eval_cli_scores_equal_run_tasks(compressed, tmp_path):
    from compactify.evaluate import run_tasks
    from compactify.tasks.prepare import prepare_eval_data

    import shutil

    path, model = compressed
    # The study's rendered piqa config, with the hook module it names (compactify.tasks.utils)
    # beside it as a file: lm-eval looks there before importing, so compactify stays blocked.
    include = tmp_path / "tasks"
    (include / "compactify" / "tasks").mkdir(parents=True)
    shutil.copy(prepare_eval_data() / "piqa.yaml", include)
    shutil.copy(inspect.getfile(__import__("compactify.tasks.utils").tasks.utils), include / "compactify" / "tasks")
    ours = run_tasks(model, load_model(path)[1], tasks=["piqa"], limit=4, batch_size=4, autocast=None)["piqa"]
    fresh_python("""
        import sys
        from lm_eval.__main__ import cli_evaluate
        sys.argv = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={sys.argv[1]},trust_remote_code=True",
                    "--tasks", "piqa", "--include_path", sys.argv[2], "--limit", "4", "--batch_size", "4",
                    "--seed", "0,0,0,0", "--output_path", sys.argv[3], "--log_samples"]
        cli_evaluate()
    """, path, include, tmp_path / "lm_eval_out", cwd=tmp_path)
    files = glob.glob(str(tmp_path / "lm_eval_out" / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1, files
    cli = json.loads(open(files[0]).read())["results"]["piqa"]
    assert ours["n"] == 4 and ours["value"] == cli["acc_norm,none"]
    assert cli["acc,none"] == ours["metrics"]["acc,none"] and cli["acc_norm,none"] == ours["metrics"]["acc_norm,none"]
    # Stronger than equal accuracies: the same log-likelihood for every choice of every document,
    # against lm-eval run in this process on the in-memory model.
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from compactify.evaluate import task_manager

    here = simple_evaluate(model=HFLM(pretrained=model, tokenizer=load_model(path)[1], batch_size=4), tasks=["piqa"],
                           task_manager=task_manager("local"), limit=4, log_samples=True, random_seed=0,
                           numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)["samples"]["piqa"]
    logged = glob.glob(str(tmp_path / "lm_eval_out" / "**" / "samples_piqa_*.jsonl"), recursive=True)
    there = [json.loads(line) for line in open(logged[0])]
    def resps(samples):  # the logged file holds each (log-likelihood, is_greedy) as strings
        return [[[[str(v) for v in r] for r in choice] for choice in s["resps"]]
                for s in sorted(samples, key=lambda s: s["doc_id"])]

    assert len(there) == 4 and resps(here) == resps(there)
