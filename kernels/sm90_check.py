"""Compile the Triton kernels for Hopper (sm_90) on any machine, no GPU needed (Triton ships LLVM,
ptxas and cuobjdump), exactly as the launchers would specialise them on the card.

    .venv/bin/python -m transrec.kernels.sm90_check fwd 768          # each table config: REG, STACK, shared
    .venv/bin/python -m transrec.kernels.sm90_check bwd 256 --sweep  # a wider grid, least spill first
    .venv/bin/python -m transrec.kernels.sm90_check dq 768           # stages: fwd lse bwd dq (triton_config)
    .venv/bin/python -m transrec.kernels.sm90_check lse 256 --split 3  # the split-M launch (partials)
    .venv/bin/python -m transrec.kernels.sm90_check verify           # every reachable launch fits?
    .venv/bin/python -m transrec.kernels.sm90_check verify --quick   # every config, at its largest launch

What is compiled comes from the launchers themselves: ``triton_op.canonical_inputs`` makes the inputs
(CPU tensors of each launch dtype), ``forward_launch``/``backward_dk_launch`` build the launch the card
would run, the autotuner's own config list and the heuristics wrapper give each config's keywords, and
Triton's own binder turns the arguments into the signature and the specialisation (strides of 1 become
constants, 16-byte aligned pointers and sizes divisible by 16 are marked so). A check that compiles
without that specialisation sees scalar loads that cannot be copied asynchronously and reports far
less shared memory than the card then asks for.

``verify`` enumerates every reachable specialisation (dtype x gradient switches x EVEN_M x split-M
or not x config, for the D values of ``triton_config.CHECK_D``), compiles each distinct one only as far as
shared-memory allocation (TTGIR plus the allocation pass: no LLVM, no ptxas), and exits 1 if any
needs more than the card's 232,448 B; the largest of each stage also goes through the backend's LLIR
stage, where Triton sets the kernel's shared-memory figure, and must agree. The full compiles of the
report modes read the same number from Triton's metadata and cross-check the short path too.
``verify --quick`` compiles every table config at every D, at the launches that need the most shared
memory (QUICK_*: about a fifth of the sweep); the full sweep checks that they do. Figures are cached
per specialisation key (kernel source, signature, constants, options; Triton version) in .cache/sm90,
and distinct specialisations compile in ``--jobs`` processes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (also triton_config.SMEM_LIMIT)
CAPABILITY = 90
# The kernel stages, as the tables of triton_config name them: the forward with the dQ accumulator
# ("fused" design), the forward without it ("split" design, or q without gradient), the dK pass and
# the dQ pass ("split" design).
STAGES = ("fwd", "lse", "bwd", "dq")


def _target():
    from triton.backends.compiler import GPUTarget  # lazy: after TRITON_INTERPRET is cleared

    return GPUTarget("cuda", CAPABILITY, 32)


# ----- what the launchers would launch -----
def _inputs(dtype, n, m, d):
    import torch  # lazy: after TRITON_INTERPRET is cleared

    from transrec.kernels.triton_op import canonical_inputs  # lazy: after TRITON_INTERPRET is cleared

    q = torch.zeros(n, d, dtype=dtype)
    k = torch.zeros(m, d, dtype=dtype)
    return canonical_inputs(q, k, torch.zeros(n, dtype=torch.int64), torch.zeros(m, dtype=dtype))


def launches(stage: str, d: int, dtypes=None, ms=(1024, 1000), splits=(1, 2)):
    """Every launch of ``stage`` at embedding size ``d`` the dispatcher can make, as (label, Launch):
    each launch dtype, each gradient switch the autograd function can set (no bias is a bias of zeros), M
    a multiple of every BLOCK_N or not (the EVEN_M heuristic), and unsplit or split over the streamed
    side (split-M, triton_config.num_splits: the PARTIAL heuristic; S itself is not specialised on, the
    fused forward never splits). Sizes are otherwise immaterial (the kernels do not specialise on them)."""
    import torch  # lazy: after TRITON_INTERPRET is cleared

    from transrec.kernels.triton_backward import (  # lazy: after TRITON_INTERPRET is cleared
        backward_dk_launch,
        backward_dq_launch,
    )
    from transrec.kernels.triton_config import LAUNCH_DTYPES  # lazy: after TRITON_INTERPRET is cleared
    from transrec.kernels.triton_forward import forward_launch  # lazy: after TRITON_INTERPRET is cleared

    n = 64
    for dtype, m, split in itertools.product(dtypes or LAUNCH_DTYPES, ms, splits):
        if stage == "fwd" and split > 1:
            continue
        q, k, t, b = _inputs(dtype, n, m, d)
        name = str(dtype)[6:]
        lse2, g = torch.zeros(n), torch.zeros(n)
        if stage in ("fwd", "lse"):
            dq = stage == "fwd"
            launch, _ = forward_launch(q, k, b, t, 0.05, dq, split=split)
            yield f"{name} M={m} split={split} dq={int(dq)}", launch
        elif stage == "dq":
            launch, _ = backward_dq_launch(q, k, b, t, lse2, g, 0.05, split=split)
            yield f"{name} M={m} split={split}", launch
        else:
            for dk, db in [(True, True), (True, False), (False, True)]:  # backward runs if one is needed
                launch, _ = backward_dk_launch(q, k, b, t, lse2, g, 0.05, dk, db, split=split)
                yield f"{name} M={m} split={split} dk={int(dk)} db={int(db)}", launch


def configs_of(launch):
    """(jitted function, keywords) per config the launch may run: the autotuner's configs (or the
    pinned keywords), then the heuristics, as ``Autotuner.run`` and ``Heuristics.run`` apply them."""
    kern, variants = launch.kernel, [dict(launch.kwargs)]
    if hasattr(kern, "configs"):  # triton.runtime.autotuner.Autotuner
        variants = [dict(launch.kwargs, **c.all_kwargs()) for c in kern.configs]
        kern = kern.fn
    if hasattr(kern, "values"):  # triton.runtime.autotuner.Heuristics
        named = dict(zip(kern.arg_names, launch.args))
        for kw in variants:
            for name, rule in kern.values.items():
                kw[name] = rule({**named, **kw})
        kern = kern.fn
    return [(kern, kw) for kw in variants]


def _heuristics(kern) -> dict:
    """The heuristics (name -> rule) of a launch's kernel, under an autotuner or not."""
    kern = getattr(kern, "fn", kern) if hasattr(kern, "configs") else kern
    return dict(getattr(kern, "values", {}))


class Spec:
    """One specialisation as Triton's JIT would build it for an sm_90 card (JITFunction.run's path)."""

    def __init__(self, fn, args, kwargs):
        from triton.compiler import make_backend  # lazy: after TRITON_INTERPRET is cleared
        from triton.runtime.jit import create_function_from_signature  # lazy: see main()

        backend = make_backend(_target())
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        self.options, self.signature, self.constexprs, self.attrs = fn._pack_args(
            backend, kwargs, bound, specialization, options)
        self.fn, self.kwargs = fn, kwargs
        text = repr((fn.cache_key, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.__dict__.items())))
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]

    def source(self):
        from triton.compiler import ASTSource  # lazy: after TRITON_INTERPRET is cleared

        return ASTSource(self.fn, self.signature, self.constexprs, self.attrs)

    def tiles(self) -> str:
        kw = self.kwargs
        return (f"BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']} warps={kw['num_warps']} "
                f"stages={kw['num_stages']} resident={int(kw['RESIDENT'])}")


def _lower(spec: Spec, stage: str):
    """The code generator, then the backend's own stages up to ``stage`` ("ttgir" or "llir"), as
    ``triton.compile`` runs them for sm_90: (module or LLVM IR text, metadata, options)."""
    from triton._C.libtriton import ir  # lazy: after TRITON_INTERPRET is cleared
    from triton.compiler import make_backend  # lazy: after TRITON_INTERPRET is cleared

    target = _target()
    backend = make_backend(target)
    options = backend.parse_options(spec.options.__dict__)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stages = {}
    backend.add_stages(stages, options, spec.source().language)
    mod = spec.source().make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
    metadata = {"hash": spec.key, "target": target, **options.__dict__}
    for name in ("ttir", "ttgir", "llir")[:("ttir", "ttgir", "llir").index(stage) + 1]:
        mod = stages[name](mod, metadata)
    return mod, metadata, options


def shared_bytes(spec: Spec) -> int:
    """Shared memory of one specialisation: the code generator and the TTGIR passes of the backend,
    then the passes of its LLIR stage up to and including shared-memory allocation."""
    from triton._C.libtriton import ir, nvidia, passes  # lazy: after TRITON_INTERPRET is cleared
    from triton.backends.nvidia.compiler import get_ptx_version_from_options  # lazy: see main()

    mod, _, options = _lower(spec, "ttgir")
    pm = ir.pass_manager(mod.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    try:
        passes.ttgpuir.add_allocate_warp_groups(pm)
    except TypeError:  # newer Triton: (pm, consan)
        passes.ttgpuir.add_allocate_warp_groups(pm, False)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, CAPABILITY,
                                                        get_ptx_version_from_options(options, CAPABILITY))
    pm.run(mod, "sm90_check_shared")
    return int(mod.get_int_attr("ttg.shared") or 0)


def llir_shared(spec: Spec) -> int:
    """Triton's own figure: the backend's whole LLIR stage sets the ``shared`` of the kernel's
    metadata (what a launch checks against the card); the PTX and cubin stages do not change it."""
    return int(_lower(spec, "llir")[1]["shared"] or 0)


def full_compile(spec: Spec) -> dict:
    """The whole pipeline to a cubin: registers and spill stack (cuobjdump), shared memory, wgmma."""
    import triton  # lazy: after TRITON_INTERPRET is cleared

    t0 = time.time()
    k = triton.compile(spec.source(), target=_target(), options=spec.options.__dict__)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    num = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", res)) else -1
    return dict(reg=num("REG"), stack=num("STACK"), shared=k.metadata.shared,
                wgmma="wgmma" in k.asm.get("ptx", ""), seconds=time.time() - t0)


# ----- verify: every reachable specialisation fits -----
# The quick check (``verify --quick``, the sm_90 test of `make test`): every config of every table, at
# every D of CHECK_D and every stage, each compiled at the launch that needs the most shared memory:
# one dtype per element size, M not a multiple of BLOCK_N (masked), split-M (partials; the fused
# forward never splits), and for the dK pass both the launch with every accumulator and the one
# without dK. The full sweep checks that premise: per (stage, D, element size, config) the quick
# launches reach the largest figure of all launches (tests/test_kernels_sm90.py).
QUICK_DTYPES = ("bfloat16", "float32")
QUICK_M = 1000
QUICK_SPLIT = 2
QUICK_BWD = (("1", "1"), ("0", "1"))  # (dk, db) as the labels write them
_PENDING: list = []  # specialisations handed to forked workers by index
CACHE_VERSION = 1  # bump when shared_bytes changes what it measures


def _quick_launch(label: str) -> bool:
    """Whether a verify label (stage, class, D, dtype, then ``launches``' fields) is a quick launch,
    whatever its dtype."""
    words = label.split()
    f = dict(w.split("=", 1) for w in words[4:] if "=" in w)
    split = "1" if words[0] == "fwd" else str(QUICK_SPLIT)
    return (f["M"] == str(QUICK_M) and f["split"] == split
            and (words[0] != "bwd" or (f["dk"], f["db"]) in QUICK_BWD))


def is_quick(label: str) -> bool:
    """Whether ``verify --quick`` compiles the launch of a verify label."""
    return label.split()[3] in QUICK_DTYPES and _quick_launch(label)


def _cache_path():
    import triton  # lazy: after TRITON_INTERPRET is cleared

    root = os.environ.get("TRANSREC_SM90_CACHE") or os.path.join(  # the repo root, through the symlink
        os.path.dirname(os.path.dirname(os.path.realpath(__file__))), ".cache", "sm90")
    return os.path.join(root, f"shared-v{CACHE_VERSION}-triton{triton.__version__}.json")


def _load_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_cache(new: dict):
    """Merge ``new`` (spec key -> bytes) into the cache file (keys hash the kernel source, signature,
    constants, attributes and options, so an edit to a kernel or a table compiles afresh)."""
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = {**_load_cache(), **new}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only checkout: no cache, same answer


def _shared_of(i: int) -> int:
    return shared_bytes(_PENDING[i])


def _llir_shared_of(i: int) -> int:
    return llir_shared(_PENDING[i])


def _cost(spec: Spec) -> tuple:
    """Compile time grows with the D chunks unrolled and the tile: the costliest go first, so that the
    last worker does not finish long after the other."""
    kw = spec.kwargs
    return (-kw.get("NUM_DC", 1), -kw["BLOCK_M"] * kw["BLOCK_N"])


def verify(d_values: dict | None = None, jobs: int = 1, dtypes=None, cross_check: bool = True,
           use_cache: bool = True, quick: bool = False, stages=STAGES, out=sys.stdout) -> list[dict]:
    """Shared memory of every distinct reachable specialisation (``quick``: of the quick launches);
    prints one line per over-limit one and a summary per (stage, class, D, dtype). ``cross_check``:
    lower the largest of each stage through the backend's LLIR stage and compare Triton's figure (the
    kernel metadata's) with the short path's. ``use_cache``: reuse the figures of specialisations
    compiled before (.cache/sm90, or $TRANSREC_SM90_CACHE). ``jobs`` > 1: forked compiler processes.
    Returns rows (key, shared, labels)."""
    import torch  # lazy: after TRITON_INTERPRET is cleared

    from transrec.kernels.triton_config import CHECK_D  # lazy: after TRITON_INTERPRET is cleared

    d_values = d_values or CHECK_D
    if quick and dtypes is None:
        dtypes = [getattr(torch, name) for name in QUICK_DTYPES]
    sizes = dict(ms=(QUICK_M,), splits=(1, QUICK_SPLIT)) if quick else {}
    t0 = time.time()
    distinct = {}  # key -> (Spec, labels)
    combos = 0
    for dclass, ds in d_values.items():
        for d, stage in itertools.product(ds, stages):
            for label, launch in launches(stage, d, dtypes, **sizes):
                label = f"{stage} {dclass} D={d} {label}"
                if quick and not _quick_launch(label):
                    continue
                for fn, kw in configs_of(launch):
                    spec = Spec(fn, launch.args, kw)
                    combos += 1
                    distinct.setdefault(spec.key, (spec, []))[1].append(f"{label} {spec.tiles()}")
    items = list(distinct.values())
    _PENDING[:] = [spec for spec, _ in items]  # before the workers fork: they read it by index
    print(f"{combos} launch x config combinations{' (quick)' if quick else ''}, {len(items)} distinct "
          f"specialisations (Triton {_triton_version()}, sm_{CAPABILITY})", file=out, flush=True)
    cache = _load_cache() if use_cache else {}
    todo = sorted((i for i, (spec, _) in enumerate(items) if spec.key not in cache),
                  key=lambda i: _cost(items[i][0]))
    print(f"{len(items) - len(todo)} from the cache ({_cache_path()}), {len(todo)} to compile", file=out,
          flush=True)
    pool = None
    if jobs > 1 and (len(todo) > 1 or cross_check):
        import multiprocessing as mp  # lazy: after TRITON_INTERPRET is cleared

        pool = mp.get_context("fork").Pool(jobs)  # forked workers share the specialisations built here
    run = (lambda f, idx: pool.map(f, idx, chunksize=1)) if pool else (lambda f, idx: [f(i) for i in idx])
    try:
        new = {items[i][0].key: s for i, s in zip(todo, run(_shared_of, todo))}
        if use_cache and new:
            _save_cache(new)
        cache.update(new)
        rows = [dict(key=spec.key, shared=cache[spec.key], labels=labels) for spec, labels in items]
        over = [r for r in rows if r["shared"] > SMEM_LIMIT]
        for r in over:
            print(f"OVER {r['shared']} B > {SMEM_LIMIT}: {r['labels'][0]}"
                  + (f" (+{len(r['labels']) - 1} more launches)" if len(r["labels"]) > 1 else ""), file=out)
        summary = {}
        for r in rows:
            for lab in r["labels"]:
                stage, dclass, d, dtype = lab.split()[:4]
                key = (stage, dclass, d, dtype)
                summary[key] = max(summary.get(key, 0), r["shared"])
        for (stage, dclass, d, dtype), s in sorted(summary.items()):
            print(f"{stage} {dclass:5} {d:7} {dtype:8} max shared {s:7d} B", file=out)
        if cross_check:  # the short path against Triton's own figure, the largest of each stage; of
            # equal ones, a 16-bit one (the tensor-core path, lowered in a fraction of the time)
            def rank(i):
                sixteen = rows[i]["labels"][0].split()[3] != "float32"
                return rows[i]["shared"], sixteen, items[i][0].kwargs["num_warps"]

            tops = [max((i for i, r in enumerate(rows) if r["labels"][0].startswith(stage + " ")), key=rank)
                    for stage in stages]
            keys = ["llir:" + items[i][0].key for i in tops]
            todo = sorted({i for i, k in zip(tops, keys) if k not in cache}, key=lambda i: _cost(items[i][0]))
            new = {"llir:" + items[i][0].key: s for i, s in zip(todo, run(_llir_shared_of, todo))}
            if use_cache and new:
                _save_cache(new)
            cache.update(new)
            for stage, i, k in zip(stages, tops, keys):
                short = rows[i]["shared"]
                print(f"cross-check {stage}: LLIR stage {cache[k]} B, allocation pass {short} B", file=out)
                if cache[k] != short:
                    raise RuntimeError(f"allocation-only shared memory {short} != LLIR stage {cache[k]}")
    finally:
        if pool:
            pool.terminate()
    print(f"{len(over)} over the limit; {time.time() - t0:.0f} s", file=out, flush=True)
    return rows


def _triton_version() -> str:
    import triton  # lazy: after TRITON_INTERPRET is cleared

    return triton.__version__


# ----- report: registers / spills / shared of a table or a sweep, at the main specialisation -----
def report(stage: str, d: int, dtype_name: str = "bfloat16", sweep: bool = False, even_m: bool = True,
           split: int = 1):
    """Full compiles of the launch with bias and every gradient (bf16 by default), per table config or
    over a wider grid (``sweep``): the numbers to choose a table by. ``split`` > 1: the split-M
    launch (partial results; the fused forward has none)."""
    import torch  # lazy: after TRITON_INTERPRET is cleared

    from transrec.kernels.triton_config import config_kwargs  # lazy: after TRITON_INTERPRET is cleared

    dtype = getattr(torch, dtype_name)
    label, launch = next(iter(launches(stage, d, [dtype], [1024 if even_m else 1000], [split])))
    specs = [Spec(fn, launch.args, kw) for fn, kw in configs_of(launch)]
    if sweep:
        base = configs_of(launch)[0]
        fn, kw0 = base
        specs = []
        ndc = kw0["NUM_DC"]
        rules = _heuristics(launch.kernel)
        named = dict(zip(fn.arg_names, launch.args))
        for c in itertools.product([32, 64, 128], [32, 64, 128], [4, 8, 16], [1, 2, 3, 4],
                                   [True, False] if ndc == 1 else [True]):
            kw = dict(kw0, **config_kwargs(c[:4] + (c[4],)))
            for name, rule in rules.items():  # EVEN_M, ACC_T, PARTIAL: as the launch would set them
                kw[name] = rule({**named, **kw})
            specs.append(Spec(fn, launch.args, kw))
    results = []
    print(f"{stage} D={d} {label} (Triton {_triton_version()}, sm_{CAPABILITY})", flush=True)
    for spec in specs:
        try:
            if sweep and (short := shared_bytes(spec)) > SMEM_LIMIT:  # no full compile: it cannot launch
                print(f"  {spec.tiles()}: shared={short} over the shared-memory limit", flush=True)
                continue
            r = full_compile(spec)
        except Exception as e:  # noqa: BLE001 (a config the compiler refuses is reported, not fatal)
            print(f"  {spec.tiles()}: compile failed: {type(e).__name__}: {str(e)[:160]}")
            continue
        short = shared_bytes(spec)
        assert short == r["shared"], f"allocation-only shared {short} != full compile {r['shared']}"
        r["tiles"] = spec.tiles() + (" acc_t=1" if spec.kwargs.get("ACC_T") else "")
        results.append(r)
        print("  " + show(r), flush=True)
    if sweep:
        print("\nleast spill first (fits in shared memory only):")
        fit = [r for r in results if r["shared"] <= SMEM_LIMIT]
        for r in sorted(fit, key=lambda r: (r["stack"], r["reg"])):
            print("  " + show(r))
    return results


def show(r: dict) -> str:
    fits = "" if r["shared"] <= SMEM_LIMIT else "  (over the shared-memory limit)"
    return (f"{r['tiles']}: REG:{r['reg']} STACK:{r['stack']} shared={r['shared']} wgmma={r['wgmma']} "
            f"({r['seconds']:.1f} s){fits}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="sm_90 register/spill/shared-memory check of the kernels")
    ap.add_argument("what", choices=[*STAGES, "verify"])
    ap.add_argument("d", type=int, nargs="?", help="embedding size (a stage); verify: triton_config.CHECK_D")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="a stage: bfloat16 unless given; verify: every launch dtype unless given")
    ap.add_argument("--sweep", action="store_true", help="a wider grid than the autotune table")
    ap.add_argument("--ragged-m", action="store_true", help="M not a multiple of BLOCK_N (EVEN_M false)")
    ap.add_argument("--split", type=int, default=1, help="a stage: the split-M launch with this S (> 1)")
    ap.add_argument("--jobs", type=int, default=1, help="verify: compiler processes")
    ap.add_argument("--json", type=str, default=None, help="verify: write the rows here")
    ap.add_argument("--no-cache", action="store_true", help="verify: compile everything afresh")
    ap.add_argument("--quick", action="store_true", help="verify: every config at its largest launch only")
    ap.add_argument("--stage", choices=STAGES, action="append", help="verify: this stage only (repeatable)")
    args = ap.parse_intermixed_args(argv)  # D may follow the options
    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported
    if args.what == "verify":
        d_values = None
        if args.d:
            from transrec.kernels.triton_config import (  # lazy: after TRITON_INTERPRET is cleared
                d_class,
                d_layout,
            )

            d_values = {d_class(*d_layout(args.d)[:2]): (args.d,)}
        import torch  # lazy: after TRITON_INTERPRET is cleared

        dtypes = [getattr(torch, args.dtype)] if args.dtype else None
        rows = verify(d_values, jobs=args.jobs, dtypes=dtypes, use_cache=not args.no_cache, quick=args.quick,
                      stages=tuple(args.stage or STAGES))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(triton=_triton_version(), rows=rows), f)
        return 1 if any(r["shared"] > SMEM_LIMIT for r in rows) else 0
    if args.d is None:
        ap.error(f"{args.what} needs D")
    report(args.what, args.d, args.dtype or "bfloat16", args.sweep, even_m=not args.ragged_m,
           split=args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
