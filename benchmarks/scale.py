"""Larger than memory (issue 17): quantize a 4.4 GB random-weight Llama inside a 2.5 GB memory cgroup.

1. Generate the model once (4.4 GB of disk; 25 s and a 494 MiB peak RSS on 2 CPU cores: it never holds more
   than one tensor, at most the 262 MB embedding, in memory):

       python benchmarks/scale.py make-model /tmp/tinyllama-random
       python benchmarks/scale.py check /tmp/tinyllama-random --forward   # index, headers, samples, a streamed forward

   TinyLlama-1.1B's shapes (hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 KV heads, vocab 32000,
   rms_norm_eps 1e-5, rope_theta 10000, 2048 positions, untied lm_head), float32, seeded: every tensor is
   normal(0, 0.02) (embedding, projections, lm_head) or ones (norms) from its own generator seeded with
   sha256(f"{seed}/{name}"), so the bytes do not depend on the order or the shard size. Written as transformers
   writes a sharded checkpoint (``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``, 2 GB
   shards by default: 3 shards), the config.json transformers' LlamaConfig writes, a generation_config.json, and
   the tokenizer files of ../shared/models/stories260K (tokenizer.json, tokenizer_config.json,
   special_tokens_map.json: a 512-token SentencePiece BPE, so every id it produces is < 32000; the model's other
   31488 embedding rows are simply never used). A README.md in the directory says the same.

   A small variant to check that transformers loads it (AutoModelForCausalLM.from_pretrained, its state dict
   against the files, a forward pass with finite logits):

       python benchmarks/scale.py make-model /tmp/llama-tiny --layers 2 --hidden 256 --intermediate 512 \\
           --vocab 1000 --heads 4 --kv-heads 2 --max-shard-size 2MB
       python benchmarks/scale.py check /tmp/llama-tiny --load

2. The proof: ``quantize model MODEL --recipe w4a16 --samples 16 --calib-seqlen 512 --out OUT --overwrite``
   twice, once in a cgroup v1 memory cgroup capped at 2.5 GB (2,500,000,000 bytes, no swap) and once uncapped;
   the capped run must finish and both outputs must be byte-identical (sha256 of every file):

       LOWBIT_DATA_DIR=../shared/data python benchmarks/scale.py run --model /tmp/tinyllama-random \\
           --json benchmarks/results/scale.jsonl

   Options: --cap (default 2.5GB; GB = 10^9, GiB = 2^30), --out-dir (OUT-DIR/capped, OUT-DIR/uncapped),
   --skip-uncapped, --recipe, --no-evict, --cgroup-parent; any argument it does not know goes to ``quantize``
   unchanged (after the ones above, e.g. ``-- --batch-size 4``). Exit status 0 only when the capped run
   finished and (unless --skip-uncapped) the outputs are identical.

   The cgroup is a child of this process's own memory cgroup (``/proc/self/cgroup``; the root
   ``/sys/fs/cgroup/memory`` on a plain machine), named ``lowbit-scale-<pid>``, and removed at the end, failure
   or not. The child is started as ``sh -c 'echo $$ > CG/cgroup.procs; exec quantize ...'``, so it is in the
   cgroup before quantize starts. Reported per run: wall time, the child's peak RSS (``ru_maxrss`` from
   ``os.wait4`` of that child: its own peak, not the max over every child this script waited for), return code
   (-9: killed, e.g. by the OOM killer) and, for the capped run, ``memory.max_usage_in_bytes`` (memsw too),
   ``memory.failcnt`` and the OOM kill count of ``memory.oom_control`` (trust that and the return code: on the
   6.18 kernel this was written on, failcnt read 0 even after an OOM kill).
   Two ways the two numbers differ: a v1 memory cgroup is charged for the page cache its processes bring in
   (reclaimable, so usage sits at the cap while the kernel reclaims clean file pages, and max_usage may be the
   cap itself without any harm), and RSS counts the file pages the process has mapped (an mmap of a safetensors
   file, which the cgroup reclaims; torch's shared libraries, which were charged to whichever cgroup read them
   first: a run killed under a 286 MiB cap had peaked at 446 MiB RSS). A page already in the page cache stays
   charged to the cgroup that read it first, so before each run the model's safetensors files are dropped from the page cache
   (``posix_fadvise(DONTNEED)``, those files only; ``--no-evict`` skips it): the capped run is then charged for
   every page of the model it reads, and both runs start cold.

3. SmolLM2-135M w4a16 peak RSS, defaults (128 x 512 calibration), uncapped (issue 17 target <= 1.5 GB, 2318 MiB
   before it):

       LOWBIT_DATA_DIR=../shared/data python benchmarks/scale.py smollm2 --json benchmarks/results/scale.jsonl

Each of ``run`` and ``smollm2`` appends one JSON line to --json: date, git commit (``dirty``: the tracked files that
differ from it), the command, cap, peaks, walls, identical, output size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the `kernels` package that
# transformers imports: drop it (as benchmarks/hf_logits.py does).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_FROM = REPO.parent / "shared" / "models" / "stories260K"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
MIB = 2**20

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '2.5G' -> 2_500_000_000, '1.5GiB' -> 1_610_612_736, '512' -> 512 (as transformers'
    max_shard_size: decimal K/M/G, binary KiB/MiB/GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GB, 2.5G, 1.5GiB, 500MB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


# ----------------------------------------------------------------------------------------------------------------
# make-model


@dataclass(frozen=True)
class Shape:
    """The shapes of the Llama to generate (defaults: TinyLlama-1.1B)."""

    layers: int = 22
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    max_position: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Spec:
    """One parameter: its state-dict name, shape and initialisation ("normal" or "ones")."""

    name: str
    shape: tuple[int, ...]
    init: str

    @property
    def nbytes(self) -> int:
        n = 4  # float32
        for d in self.shape:
            n *= d
        return n


def param_specs(s: Shape) -> list[Spec]:
    """Every tensor of LlamaForCausalLM's state dict, in its order (embedding, blocks, final norm, lm_head)."""
    h, hd = s.hidden, s.head_dim
    specs = [Spec("model.embed_tokens.weight", (s.vocab, h), "normal")]
    for i in range(s.layers):
        p = f"model.layers.{i}"
        specs += [
            Spec(f"{p}.self_attn.q_proj.weight", (s.heads * hd, h), "normal"),
            Spec(f"{p}.self_attn.k_proj.weight", (s.kv_heads * hd, h), "normal"),
            Spec(f"{p}.self_attn.v_proj.weight", (s.kv_heads * hd, h), "normal"),
            Spec(f"{p}.self_attn.o_proj.weight", (h, s.heads * hd), "normal"),
            Spec(f"{p}.mlp.gate_proj.weight", (s.intermediate, h), "normal"),
            Spec(f"{p}.mlp.up_proj.weight", (s.intermediate, h), "normal"),
            Spec(f"{p}.mlp.down_proj.weight", (h, s.intermediate), "normal"),
            Spec(f"{p}.input_layernorm.weight", (h,), "ones"),
            Spec(f"{p}.post_attention_layernorm.weight", (h,), "ones"),
        ]
    specs += [Spec("model.norm.weight", (h,), "ones"), Spec("lm_head.weight", (s.vocab, h), "normal")]
    return specs


def shard_specs(specs: Sequence[Spec], max_shard_size: int) -> list[list[Spec]]:
    """Split as huggingface_hub's split_torch_state_dict_into_shards does (state-dict order; a new shard when the
    next tensor would pass max_shard_size; a tensor larger than that alone in its own shard)."""
    shards: list[list[Spec]] = []
    current: list[Spec] = []
    size = 0
    for spec in specs:
        if spec.nbytes > max_shard_size:
            shards.append([spec])
            continue
        if current and size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def make_tensor(spec: Spec, seed: int, std: float) -> torch.Tensor:
    """The tensor's values: its own generator (so order and sharding do not matter), float32, contiguous."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=torch.float32)
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    return torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, std, generator=g)


def safetensors_header(specs: Sequence[Spec]) -> tuple[bytes, list[Spec]]:
    """The header (8-byte little-endian length + JSON padded with spaces to a multiple of 8) and the order of the
    data, laid out as safetensors.torch.save_file lays it out (one dtype: sorted by name), so the file is the
    bytes save_file would write for the same tensors."""
    ordered = sorted(specs, key=lambda s: s.name)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in ordered:
        header[s.name] = {"dtype": "F32", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, ordered


def write_shard(path: Path, specs: Sequence[Spec], seed: int, std: float, bar: tqdm) -> None:
    """Write one safetensors file tensor by tensor: at most one tensor in memory."""
    header, ordered = safetensors_header(specs)
    with open(path, "wb") as f:
        f.write(header)
        for spec in ordered:
            t = make_tensor(spec, seed, std)
            f.write(memoryview(t.numpy()).cast("B"))
            del t
            bar.update(spec.nbytes)


def write_config(directory: Path, s: Shape) -> None:
    """config.json and generation_config.json exactly as transformers writes them for LlamaForCausalLM."""
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        max_position_embeddings=s.max_position, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"], dtype="float32",
    )
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)


README = """# Random-weight Llama (benchmarks/scale.py make-model)

Not a trained model: every weight is random, for memory and determinism benchmarks only (issue 17).

- shapes: {shape}
- weights: float32; embedding, q/k/v/o, gate/up/down and lm_head normal(0, {std}), norms ones; each tensor from its
  own torch.Generator seeded with sha256("{seed}/<name>"), so regenerating gives the same bytes
- tokenizer: copied from {tokenizer_from} (stories260K, a 512-token SentencePiece BPE with byte fallback); its ids
  are all < vocab_size, the other embedding rows are never used
- command: {command}
"""


def make_model(args: argparse.Namespace) -> None:
    s = Shape(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, args.max_position)
    if s.hidden % s.heads or s.heads % s.kv_heads:
        sys.exit(f"hidden ({s.hidden}) must be a multiple of heads ({s.heads}), heads of kv-heads ({s.kv_heads})")
    tok_from: Path = args.tokenizer_from
    missing = [f for f in TOKENIZER_FILES if not (tok_from / f).is_file()]
    if missing:
        sys.exit(f"{tok_from} lacks {', '.join(missing)} (--tokenizer-from)")
    tok_vocab = len(json.loads((tok_from / "tokenizer.json").read_text())["model"]["vocab"])
    if s.vocab < tok_vocab:
        sys.exit(f"--vocab {s.vocab} is smaller than the tokenizer's {tok_vocab} tokens")
    if sys.byteorder != "little":
        sys.exit("safetensors data is little-endian; this writer copies memory as is")

    out: Path = args.dir
    specs = param_specs(s)
    shards = shard_specs(specs, args.max_shard_size)
    names = shard_names(len(shards))
    total = sum(sp.nbytes for sp in specs)
    ours = {*TOKENIZER_FILES, INDEX_FILE, SINGLE_FILE, "config.json", "generation_config.json", "README.md"}
    if out.exists():
        existing = list(out.iterdir())
        shard = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
        foreign = [p.name for p in existing if p.name not in ours and not shard.fullmatch(p.name)]
        if foreign:
            sys.exit(f"{out} holds files make-model did not write: {', '.join(sorted(foreign)[:5])}")
        if existing and not args.overwrite:
            sys.exit(f"{out} is not empty (pass --overwrite to replace the model there)")
        for p in existing:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < total * 1.05:
        sys.exit(f"{out}: {free / 1e9:.1f} GB free, the model needs {total / 1e9:.1f} GB")

    n_params = total // 4
    print(f"{out}: {n_params / 1e6:.1f} M parameters, {total / 1e9:.3f} GB float32 in {len(shards)} file(s), "
          f"seed {args.seed}")
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", file=sys.stderr) as bar:
        for name, shard in zip(names, shards):
            bar.set_postfix_str(name)
            write_shard(out / name, shard, args.seed, args.std, bar)
    if len(shards) > 1:
        weight_map = {sp.name: name for name, shard in zip(names, shards) for sp in shard}
        index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_config(out, s)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tok_from / f, out / f)
    command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    (out / "README.md").write_text(README.format(shape=asdict(s), std=args.std, seed=args.seed,
                                                 tokenizer_from=tok_from, command=command))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s ({', '.join(names)})")


# ----------------------------------------------------------------------------------------------------------------
# check


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, checked against the file's size (data contiguous, nothing after it)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    end = 0
    for a, b in spans:
        if a != end:
            raise SystemExit(f"{path.name}: data not contiguous at byte {a} (expected {end})")
        end = b
    if path.stat().st_size != 8 + n + end:
        raise SystemExit(f"{path.name}: {path.stat().st_size} bytes, the header describes {8 + n + end}")
    return header


def model_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (the index's shards, or model.safetensors)."""
    index = directory / INDEX_FILE
    if index.is_file():
        return [directory / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / SINGLE_FILE]


def check(args: argparse.Namespace) -> None:
    """Cheap checks (no full load): names, shapes, dtype, offsets, the index, a few tensors' values; --load adds
    transformers."""
    from safetensors import safe_open

    d: Path = args.dir
    cfg = json.loads((d / "config.json").read_text())
    s = Shape(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
              cfg["num_key_value_heads"], cfg["vocab_size"], cfg["max_position_embeddings"])
    expected = {sp.name: sp for sp in param_specs(s)}
    files = model_files(d)
    located: dict[str, str] = {}
    for f in files:
        for name, info in read_header(f).items():
            sp = expected.get(name)
            if sp is None or tuple(info["shape"]) != sp.shape or info["dtype"] != "F32":
                raise SystemExit(f"{f.name}: unexpected tensor {name} {info['dtype']} {info['shape']}")
            if name in located:
                raise SystemExit(f"{name} in both {located[name]} and {f.name}")
            located[name] = f.name
    if set(located) != set(expected):
        raise SystemExit(f"missing tensors: {sorted(set(expected) - set(located))[:5]}")
    total = sum(sp.nbytes for sp in expected.values())
    if (d / INDEX_FILE).is_file():
        index = json.loads((d / INDEX_FILE).read_text())
        if index["weight_map"] != located:
            raise SystemExit("the index's weight_map does not match the shards' headers")
        if index["metadata"]["total_size"] != total:
            raise SystemExit(f"index total_size {index['metadata']['total_size']} != {total}")
    stats: dict[str, Any] = {}
    samples = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{s.layers - 1}.mlp.down_proj.weight",
               "model.norm.weight"]
    for name in samples:
        with safe_open(str(d / located[name]), "pt") as f:
            t = f.get_tensor(name)
        stats[name] = {"mean": round(float(t.mean()), 5), "std": round(float(t.std()), 5)}
    result: dict[str, Any] = {"dir": str(d), "files": [f.name for f in files], "tensors": len(located),
                              "total_size": total, "file_bytes": sum(f.stat().st_size for f in files),
                              "samples": stats}
    if args.forward:
        result["forward"] = streamed_forward(d, located)
    if args.load:
        result["load"] = load_check(d, located)
    print(json.dumps(result))


def streamed_forward(d: Path, located: dict[str, str], tokens: int = 64) -> dict[str, Any]:
    """Random token ids (< 512, the tokenizer's) through every block with transformers' Llama modules, one block's
    weights in memory at a time (fine for the full-size model): the hidden states' std after each block and whether
    everything stayed finite."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    def get(name: str) -> torch.Tensor:
        with safe_open(str(d / located[name]), "pt") as f:
            return f.get_tensor(name)

    cfg = AutoConfig.from_pretrained(d)
    cfg._attn_implementation = "sdpa"
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(tokens)[None]
    stds: list[float] = []
    with torch.no_grad():
        h = torch.nn.functional.embedding(ids, get("model.embed_tokens.weight"))
        pe = LlamaRotaryEmbedding(cfg)(h, pos)
        for i in range(cfg.num_hidden_layers):
            layer = LlamaDecoderLayer(cfg, i)
            layer.load_state_dict({k: get(f"model.layers.{i}.{k}") for k in layer.state_dict()})
            out = layer(h, position_embeddings=pe, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
            stds.append(round(float(h.std()), 4))
        norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norm.weight.data = get("model.norm.weight")
        logits = norm(h) @ get("lm_head.weight").T
    return {"tokens": tokens, "hidden_std_per_block": stds, "logits_std": round(float(logits.std()), 4),
            "finite": bool(torch.isfinite(logits).all()) and all(math.isfinite(x) for x in stds)}


def load_check(d: Path, located: dict[str, str]) -> dict[str, Any]:
    """transformers loads the directory, with exactly the files' tensors, and a forward pass gives finite logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(d).eval()
    state = model.state_dict()
    if set(state) != set(located):
        raise SystemExit(f"transformers' state dict differs: {sorted(set(state) ^ set(located))[:5]}")
    for name, shard in located.items():
        with safe_open(str(d / shard), "pt") as f:
            if not torch.equal(f.get_tensor(name), state[name]):
                raise SystemExit(f"{name}: transformers loaded other values than the file holds")
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("Once upon a time there was a little girl who liked to play.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    return {"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype), "tokens": ids.shape[1],
            "logits_finite": bool(torch.isfinite(logits).all()), "logits_std": round(float(logits.std()), 4)}


# ----------------------------------------------------------------------------------------------------------------
# run / smollm2


def quantize_exe() -> str:
    beside = Path(sys.executable).parent / "quantize"
    found = str(beside) if beside.is_file() else shutil.which("quantize")
    if not found:
        sys.exit("no `quantize` beside this python or on PATH (pip install -e .)")
    return found


def git_commit() -> dict[str, Any]:
    """HEAD (git rev-parse HEAD) and whether tracked files differ from it (the numbers are then not HEAD's)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": sorted(line[3:] for line in dirty if line.strip())}


def evict(files: Sequence[Path]) -> None:
    """Drop these files' clean pages from the page cache, so that the next run reads (and is charged for) them."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def own_memory_cgroup() -> Path:
    """This process's cgroup v1 memory cgroup directory (its children are nested under its limits)."""
    if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").is_file():
        sys.exit(f"no cgroup v1 memory controller at {CGROUP_V1_MEMORY}")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_V1_MEMORY / path.lstrip("/")
    return CGROUP_V1_MEMORY


class MemoryCgroup:
    """A child cgroup v1 memory cgroup with a hard limit (memory and memory+swap), removed on exit."""

    def __init__(self, parent: Path, limit: int) -> None:
        self.path = parent / f"lowbit-scale-{os.getpid()}"
        self.limit = limit

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swap here, but a machine with some
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
            got = int((self.path / "memory.limit_in_bytes").read_text())
            if got > self.limit:
                raise SystemExit(f"{self.path}: asked for a limit of {self.limit} bytes, the kernel set {got}")
        except BaseException:
            self.remove()
            raise
        return self

    def read(self, name: str) -> int | None:
        p = self.path / name
        return int(p.read_text()) if p.exists() else None

    def stats(self) -> dict[str, Any]:
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {
            "limit_bytes": self.read("memory.limit_in_bytes"),
            "max_usage_bytes": self.read("memory.max_usage_in_bytes"),
            "max_usage_mib": mib(self.read("memory.max_usage_in_bytes")),
            "memsw_max_usage_mib": mib(self.read("memory.memsw.max_usage_in_bytes")),
            "failcnt": self.read("memory.failcnt"),
            "memsw_failcnt": self.read("memory.memsw.failcnt"),
            "oom_kill": int(oom.get("oom_kill", 0)),
            "under_oom": int(oom.get("under_oom", 0)),
        }

    def remove(self) -> None:
        for _ in range(50):  # a just-killed task may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove {self.path} (tasks: {(self.path / 'tasks').read_text().split()})",
              file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass
class RunResult:
    wall_s: float
    returncode: int
    peak_rss_mib: float
    cgroup: dict[str, Any] | None = None
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = self.returncode == 0 and not (self.cgroup or {}).get("oom_kill")


def run_child(cmd: Sequence[str], env: dict[str, str], cgroup: MemoryCgroup | None = None) -> RunResult:
    """Run cmd (in cgroup, entered before exec) and return its wall time, exit status and its own peak RSS."""
    argv = list(cmd)
    if cgroup is not None:
        argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.path / "cgroup.procs"), *argv]
    print("$ " + " ".join(cmd) + (f"   # in {cgroup.path}, limit {cgroup.limit} bytes" if cgroup else ""),
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C (a second one included) must not leave the child running in the cgroup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.kill()
        os.wait4(proc.pid, 0)
        raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = RunResult(round(wall, 1), proc.returncode, round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is KiB
                       cgroup.stats() if cgroup else None)
    print(f"  rc {result.returncode}, {result.wall_s} s, peak RSS {result.peak_rss_mib} MiB"
          + (f", cgroup max usage {result.cgroup['max_usage_mib']} MiB, failcnt {result.cgroup['failcnt']}, "
             f"oom_kill {result.cgroup['oom_kill']}" if result.cgroup else ""), file=sys.stderr, flush=True)
    return result


def tree_hashes(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            out[str(p.relative_to(directory))] = h.hexdigest()
    return out


def compare_trees(a: Path, b: Path) -> dict[str, Any]:
    ha, hb = tree_hashes(a), tree_hashes(b)
    differ = sorted(k for k in ha.keys() & hb.keys() if ha[k] != hb[k])
    only_a, only_b = sorted(ha.keys() - hb.keys()), sorted(hb.keys() - ha.keys())
    return {"identical": not (differ or only_a or only_b) and bool(ha), "files": len(ha), "differ": differ,
            "only_in_" + a.name: only_a, "only_in_" + b.name: only_b, "sha256": ha}


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LOWBIT_DATA_DIR", str(DEFAULT_DATA_DIR))
    return env


def host() -> dict[str, Any]:
    mem = next((int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), None)
    return {"cpus": os.cpu_count(), "mem_total_mib": mib(mem), "kernel": platform.release(),
            "torch": torch.__version__, "python": platform.python_version()}


def append_json(path: Path | None, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    model: Path = args.model.resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"{model} is not a model directory (python benchmarks/scale.py make-model {model})")
    files = model_files(model)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    env = child_env()

    def cmd(out: Path) -> list[str]:
        return [quantize_exe(), "model", str(model), "--recipe", args.recipe, "--samples", str(args.samples),
                "--calib-seqlen", str(args.calib_seqlen), "--out", str(out), "--overwrite", *extra]

    parent = args.cgroup_parent or own_memory_cgroup()
    record: dict[str, Any] = {
        "bench": "scale.run", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **git_commit(), "command": " ".join(cmd(out_dir / "OUT")), "model": str(model),
        "model_bytes": sum(f.stat().st_size for f in files), "cap_bytes": args.cap, "cap_mib": mib(args.cap),
        "evict": not args.no_evict, "host": host(), "LOWBIT_DATA_DIR": env["LOWBIT_DATA_DIR"],
    }
    for stale in (out_dir / "capped", out_dir / "uncapped"):  # a failed run must not leave an old output to compare
        if (stale / "quantize_report.json").is_file():
            shutil.rmtree(stale)
    if not args.no_evict:
        evict(files)
    with MemoryCgroup(parent, args.cap) as cg:
        capped = run_child(cmd(out_dir / "capped"), env, cg)
    record["capped"] = asdict(capped)
    uncapped: RunResult | None = None
    if not args.skip_uncapped:
        if not args.no_evict:
            evict(files)
        uncapped = run_child(cmd(out_dir / "uncapped"), env)
        record["uncapped"] = asdict(uncapped)
    identical: bool | None = None
    if capped.ok and uncapped is not None and uncapped.ok:
        cmp = compare_trees(out_dir / "capped", out_dir / "uncapped")
        identical = cmp["identical"]
        record["compare"] = {k: v for k, v in cmp.items() if k != "sha256"}
        record["sha256"] = cmp["sha256"]
        print(f"outputs: {cmp['files']} files, " + ("identical" if identical else
              f"DIFFER: {cmp['differ']}, only in capped: {cmp['only_in_capped']}, "
              f"only in uncapped: {cmp['only_in_uncapped']}"), file=sys.stderr)
    record["identical"] = identical
    done = out_dir / "capped" if capped.ok else out_dir / "uncapped" if uncapped is not None and uncapped.ok else None
    record["output_bytes"] = dir_size(done) if done is not None else None
    append_json(args.json, record)
    passed = capped.ok and (args.skip_uncapped or bool(identical))
    print(("PASS" if passed else "FAIL") + f": capped run {'finished' if capped.ok else 'FAILED (rc %d)' % capped.returncode}"
          + ("" if args.skip_uncapped else f", outputs {'identical' if identical else 'NOT identical'}"), file=sys.stderr)
    return 0 if passed else 1


def smollm2(args: argparse.Namespace, extra: list[str]) -> int:
    out: Path = args.out
    cmd = [quantize_exe(), "model", "--recipe", args.recipe, "--out", str(out), "--overwrite", *extra]
    result = run_child(cmd, child_env())
    met = result.ok and result.peak_rss_mib * MIB <= args.target
    record = {"bench": "scale.smollm2", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              **git_commit(), "command": " ".join(cmd), "host": host(), **asdict(result),
              "target_mib": mib(args.target), "target_met": met,
              "output_bytes": dir_size(out) if result.ok else None}
    append_json(args.json, record)
    verdict = ("met" if met else "NOT met") if result.ok else f"run FAILED, rc {result.returncode}"
    print(f"SmolLM2-135M {args.recipe}: peak RSS {result.peak_rss_mib} MiB (target <= {mib(args.target)} MiB: "
          f"{verdict}), {result.wall_s} s", file=sys.stderr)
    return 0 if result.ok else 1


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    mk = sub.add_parser("make-model", help="write a random-weight Llama (TinyLlama-1.1B shapes by default)")
    mk.add_argument("dir", type=Path)
    mk.add_argument("--layers", type=int, default=22)
    mk.add_argument("--hidden", type=int, default=2048)
    mk.add_argument("--intermediate", type=int, default=5632)
    mk.add_argument("--heads", type=int, default=32)
    mk.add_argument("--kv-heads", type=int, default=4)
    mk.add_argument("--vocab", type=int, default=32000)
    mk.add_argument("--max-position", type=int, default=2048)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--std", type=float, default=0.02, help="std of the normal weights (norms are ones)")
    mk.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                    help="as transformers' save_pretrained: 2GB = 2*10^9 bytes (default); one shard -> model.safetensors")
    mk.add_argument("--tokenizer-from", type=Path, default=DEFAULT_TOKENIZER_FROM)
    mk.add_argument("--overwrite", action="store_true", help="replace a directory make-model wrote before")

    ck = sub.add_parser("check", help="check a make-model directory (headers, index, samples); --load: transformers")
    ck.add_argument("dir", type=Path)
    ck.add_argument("--load", action="store_true", help="also load it fully with transformers (small models only)")
    ck.add_argument("--forward", action="store_true",
                    help="run 64 tokens through the blocks one at a time (one block in memory: fine at full size)")

    rn = sub.add_parser("run", help="quantize capped and uncapped, compare the outputs")
    rn.add_argument("--model", type=Path, default=Path("/tmp/tinyllama-random"))
    rn.add_argument("--cap", type=parse_size, default=parse_size("2.5GB"), help="memory cap (default 2.5GB = 2.5*10^9 bytes)")
    rn.add_argument("--out-dir", type=Path, default=Path("/tmp/lowbit-scale"))
    rn.add_argument("--skip-uncapped", action="store_true")
    rn.add_argument("--recipe", default="w4a16")
    rn.add_argument("--samples", type=int, default=16)
    rn.add_argument("--calib-seqlen", type=int, default=512)
    rn.add_argument("--no-evict", action="store_true", help="do not drop the model files from the page cache first")
    rn.add_argument("--cgroup-parent", type=Path, default=None,
                    help="where to create the cgroup (default: this process's own memory cgroup)")
    rn.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")

    sm = sub.add_parser("smollm2", help="peak RSS of quantize model (SmolLM2-135M, defaults), uncapped")
    sm.add_argument("--recipe", default="w4a16")
    sm.add_argument("--out", type=Path, default=Path("/tmp/lowbit-scale/smollm2"))
    sm.add_argument("--target", type=parse_size, default=parse_size("1.5GB"), help="peak RSS target (default 1.5GB)")
    sm.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")

    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if extra and args.cmd not in ("run", "smollm2"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "make-model":
        make_model(args)
    elif args.cmd == "check":
        check(args)
    elif args.cmd == "run":
        return run(args, extra)
    else:
        return smollm2(args, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
