"""Issue 17: the float model read block by block, sharded outputs, --resume after SIGKILL, the same bytes with 1 or 2
threads, from separate processes and from 2 torchrun processes, bfloat16 calibration, and the one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import INDEX_FILE, WEIGHTS_FILE, weight_files
from lowbit.formats.shards import ShardWriter, parse_size, write_file
from lowbit.models.lazy import open_lazy_model
from lowbit.models.loading import load_float_model
from lowbit.quantize import pipeline
from lowbit.quantize.pipeline import quantize_model
from lowbit.quantize.recipe import load_recipe
from lowbit.quantize.resume import STATE_DIR

QUANTIZE = [sys.executable, "-m", "lowbit.cli", "model"]
SMALL = ["--samples", "16", "--calib-seqlen", "64"]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(QUANTIZE + args, capture_output=True, text=True, env=_env(**env), timeout=600)


# --- reading block by block ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["stories", "llama"])
def test_lazy_model_computes_what_from_pretrained_loads(which: str, stories_dir: Path, llama_dir: Path) -> None:
    directory = stories_dir if which == "stories" else llama_dir  # llama_dir has tied embeddings
    lazy = open_lazy_model(directory)
    assert all(p.is_meta for p in lazy.blocks.parameters())  # nothing of the blocks is read yet
    lazy.load_all()
    ref = load_float_model(directory)[0]
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lazy.model(ids).logits, ref(ids).logits)
    a, b = lazy.model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lazy.release_block(0)
    assert all(p.is_meta for p in lazy.blocks[0].parameters())


def test_lazy_model_names_a_missing_weight(stories_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in stories_dir.iterdir():
        if f.name != WEIGHTS_FILE:
            (d / f.name).write_bytes(f.read_bytes())
    tensors = _tensors(stories_dir)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    write_file(d / WEIGHTS_FILE, tensors)
    lazy = open_lazy_model(d)
    lazy.load_block(1)
    with pytest.raises(LowbitError, match="lacks 1 weights: model.layers.2.mlp.up_proj.weight"):
        lazy.load_block(2)


def test_rotations_per_block_equal_rotations_of_the_whole_model(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused-rotation recipe streams (each block rotated as it is read); forcing the whole-model path gives the
    same files."""
    streamed = tmp_path / "streamed"
    quantize_model(llama_dir, "w4a16-rot", streamed, samples=8, calib_seqlen=32, progress=False)
    monkeypatch.setattr(pipeline, "streams", lambda specs: False)
    whole = tmp_path / "whole"
    quantize_model(llama_dir, "w4a16-rot", whole, samples=8, calib_seqlen=32, progress=False)
    assert _files(streamed) == _files(whole)


# --- shards --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1000", 1000), (64, 64)])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["big", "0", "-5MB", "5XB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(LowbitError, match="max-shard-size"):
        parse_size(text)


def test_shard_writer_layout(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 3, generator=g), "b": torch.randint(-8, 8, (5, 7), dtype=torch.int8),
               "c": torch.randn(3, generator=g).half(), "d": torch.randn(100, 100, generator=g), "e": torch.randn(2, generator=g)}
    w = ShardWriter(tmp_path, 1000)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    # a (120 B), b (35), c (6) share a shard; d (40000 B) is larger than the limit: a shard of its own; then e
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == {"a": files[0], "b": files[0], "c": files[0], "d": files[1], "e": files[2]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files + [INDEX_FILE])  # no spool files left
    back = _tensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    for f in files:  # every tensor starts at a multiple of its element size
        raw = (tmp_path / f).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0
        for k, meta in json.loads(raw[8 : 8 + n]).items():
            if k != "__metadata__":
                assert meta["data_offsets"][0] % tensors[k].element_size() == 0


def test_sharded_output_holds_the_single_file_tensors(stories_dir: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    quantize_model(stories_dir, "w4a16", one, samples=8, calib_seqlen=32, progress=False)
    many = tmp_path / "many"
    result = quantize_model(stories_dir, "w4a16", many, samples=8, calib_seqlen=32, progress=False, max_shard_size="100KB")
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) >= 3 and all(re.match(r"model-\d{5}-of-\d{5}\.safetensors$", s) for s in shards)
    assert not (many / WEIGHTS_FILE).exists() and (many / INDEX_FILE).is_file()
    index = json.loads((many / INDEX_FILE).read_text())["weight_map"]
    for shard in shards:  # within the limit (+ its header), or one tensor larger than the limit on its own
        data = sum(v.numel() * v.element_size() for k, v in _tensors(many).items() if index[k] == shard)
        alone = sum(1 for f in index.values() if f == shard) == 1
        assert data <= 100_000 or alone
    a, b = _tensors(one), _tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.size_after == sum(p.stat().st_size for p in many.glob("*.safetensors"))
    assert not (many / STATE_DIR).exists()


# --- resume --------------------------------------------------------------------------------------------------------

def test_resume_after_sigkill_is_byte_identical(stories_dir: Path, tmp_path: Path) -> None:
    args = [str(stories_dir), "--samples", "64", "--calib-seqlen", "256", "--batch-size", "4"]
    reference = tmp_path / "reference"
    assert _run(args + ["--out", str(reference)]).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(QUANTIZE + args + ["--out", str(out)], stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stderr is not None
    seen = ""
    while "3/5" not in seen:  # block 3 has started
        ch = proc.stderr.read(1)
        assert ch, seen[-2000:]
        seen += ch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / STATE_DIR / "state.json").is_file()
    done = json.loads((leftovers[0] / STATE_DIR / "state.json").read_text())["done"]
    assert 1 <= done <= 4

    resumed = _run(args + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done} blocks done" in resumed.stderr
    assert _files(out) == _files(reference)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_resume_refuses_a_leftover_of_other_inputs(stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    leftover = tmp_path / ".out.tmp-999999999-x"
    (leftover / STATE_DIR).mkdir(parents=True)
    (leftover / STATE_DIR / "state.json").write_text(json.dumps({"fingerprint": "other", "done": 2, "layers": [], "block_reports": []}))
    r = _run([str(stories_dir), "--out", str(out), "--resume"] + SMALL)
    assert r.returncode == 2 and "had other inputs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert leftover.is_dir() and not out.exists()  # kept: the user may rerun the matching command


def test_resume_without_a_leftover_starts_over(stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _run([str(stories_dir), "--out", str(out), "--resume"] + SMALL)
    assert r.returncode == 0 and "starting from the first block" in r.stderr
    assert (out / WEIGHTS_FILE).is_file()


# --- determinism and processes -------------------------------------------------------------------------------------

def test_same_bytes_with_one_and_two_threads_in_separate_processes(stories_dir: Path, tmp_path: Path) -> None:
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        r = _run([str(stories_dir), "--out", str(out)] + SMALL, OMP_NUM_THREADS=threads)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(_files(out))
    assert outs[0] == outs[1]


def test_two_gloo_processes_write_what_one_process_writes(stories_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run([str(stories_dir), "--out", str(one)] + SMALL).returncode == 0
    r = _run([str(stories_dir), "--out", str(two), "--nproc", "2"] + SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "W1" not in r.stderr and "torch.distributed" not in r.stderr  # torchrun's own log lines are not shown
    assert _files(one) == _files(two)  # every code, scale and reported number


def test_a_taken_port_is_one_line(stories_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run([str(stories_dir), "--out", str(tmp_path / "o"), "--nproc", "2", "--port", str(port)] + SMALL)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --port {port} is taken (Address already in use): pick " \
        "another, or leave --port out for a free one"
    assert list(tmp_path.iterdir()) == []


def _rank_pids() -> dict[int, int]:
    """rank -> pid of the running torchrun workers of ``quantize model`` (one launcher at a time in this test)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"lowbit.cli" in cmd and b"torch.distributed.run" not in cmd:
            vals = dict(e.split(b"=", 1) for e in env if b"=" in e)
            if b"RANK" in vals and vals.get(b"TORCHELASTIC_RUN_ID") is not None:
                found[int(vals[b"RANK"])] = int(d.name)
    return found


def test_a_rank_that_dies_is_one_line_and_writes_nothing(stories_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(QUANTIZE + [str(stories_dir), "--out", str(out), "--nproc", "2", "--samples", "64",
                                        "--calib-seqlen", "256", "--batch-size", "4"],
                            stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stderr is not None
    seen = ""
    while "1/5" not in seen:
        ch = proc.stderr.read(1)
        assert ch, seen[-2000:]
        seen += ch
    ranks = _rank_pids()
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGKILL)
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) != 0
    errors = [l for l in rest.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, rest[-3000:]
    assert "Traceback" not in rest
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--calib-dtype", "float16"], "--calib-dtype 'float16': valid are float32, bfloat16"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--resume", "--recipe", "w4a16-disc"], "--resume: recipe w4a16-disc trains its rounding"),
])
def test_scale_options_refuse_bad_input_in_one_line(args: list[str], message: str, stories_dir: Path, tmp_path: Path) -> None:
    r = _run([str(stories_dir), "--out", str(tmp_path / "o")] + SMALL + args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {r.stderr.strip()[7:]}"]
    assert message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_learned_recipes_refuse_several_processes(stories_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LowbitError, match="runs in one process"):
        quantize_model(stories_dir, load_recipe("w4a16-disc"), tmp_path / "o", samples=8, calib_seqlen=32, progress=False)


# --- bfloat16 calibration ------------------------------------------------------------------------------------------

def test_bfloat16_calibration(stories_dir: Path, tmp_path: Path) -> None:
    f32 = quantize_model(stories_dir, "w4a16", tmp_path / "f32", samples=16, calib_seqlen=64, progress=False)
    bf16 = quantize_model(stories_dir, "w4a16", tmp_path / "bf16", samples=16, calib_seqlen=64, progress=False,
                          calib_dtype="bfloat16")
    report = json.loads((tmp_path / "bf16" / "quantize_report.json").read_text())
    assert report["calibration"]["dtype"] == "bfloat16"
    a, b = _tensors(tmp_path / "f32"), _tensors(tmp_path / "bf16")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the Hessians differ a little...
    err = lambda r: sum(l.output_rel_err for l in r.layers) / len(r.layers)  # noqa: E731
    assert err(bf16) < 1.05 * err(f32)  # ... and the rounding is as good
