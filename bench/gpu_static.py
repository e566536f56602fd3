"""Static model of ckbn's CUDA kernels on sm_90 (H100/H200), computed without a GPU.

    python bench/gpu_static.py [--check] [--library PATH] [--out bench/results] [--no-emulator]
    python bench/gpu_static.py --traffic-only [--check]   (no sm_90 code needed: the emulator alone)

It reads the sm_90 code in the built ckbn._C (cuobjdump -res-usage and -sass; nvdisasm must be
on PATH or in the nvidia-cuda-nvdisasm wheel) and runs the host emulator of tests/cuda_emulation
(a C++ compiler builds it on first use), and reports:
  1. per kernel: registers, stack, local memory, spill instructions, shared memory and the
     theoretical occupancy on sm_90 (see `occupancy`);
  2. per kernel: the width of its global loads and stores, and of those in its innermost loops;
  3. per operator: the bytes its kernels read and write in global memory in the emulator, against
     the design (training forward: stats read x, normalize reads x and writes y; replay: one read
     and one write; backward: its passes, fused or not);
  4. the launch plan of ResNet-50's BatchNorm shapes on an H100/H200 (132 SMs, 50 MB L2), from
     the host code itself, with the occupancy of (1): blocks per SM, waves, last-wave fill.
It writes <out>/gpu-static-<date>.{md,json} (a model, not a measurement) and, with --check, exits
with status 1 when a kernel spills, a hot loop loses its designed load width, an operator moves
more than its design, or a launch leaves the machine underfilled.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tests", "cuda_emulation", "traffic.py")

# sm_90 limits (CUDA C Programming Guide, "Compute Capabilities", and the CUDA Occupancy Calculator).
SM90 = dict(
    regs_per_sm=65536,
    reg_unit=256,
    sub_partitions=4,
    max_warps=64,
    max_blocks=32,
    shared_per_sm=228 * 1024,
    shared_per_block=227 * 1024,
    shared_unit=128,
    shared_reserved=1024,
)
H100 = dict(name="H100/H200", sms=132, l2_bytes=50 * 2**20)
# Waves a launch must make (unless it grid-strides), and how full its last one must be.
MIN_WAVES, MIN_LAST_FILL = 1.5, 0.8
# Per-channel vectors and split staging may add this fraction of one full-size tensor to an operator.
SMALL_TOLERANCE = 0.05
# Threads per block of every ckbn kernel (kThreads in csrc/cuda/launch_plan.h).
BLOCK_THREADS = 512
# Resident blocks per SM the streaming kernels are designed for (kMinBlocksPerSM in
# csrc/cuda/kernel_ops.cuh, their register budget); one that needs fewer registers may get more.
DESIGN_BLOCKS_PER_SM = 2
SCALARS = {"double": 64, "float": 32, "c10::Half": 16, "c10::BFloat16": 16}


def ceil_to(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(regs: int, shared_bytes: int, threads: int, limits: dict = SM90) -> dict:
    """Resident blocks per SM and the occupancy they give, as the CUDA Occupancy Calculator counts:
    registers are allocated per warp in units of `reg_unit` from each of the SM's sub-partitions
    (a quarter of the register file each); shared memory per block is rounded up to `shared_unit`
    plus `shared_reserved` bytes the runtime keeps per block, against the largest carveout."""
    warps = -(-threads // 32)
    by_warps = limits["max_warps"] // warps
    by_regs = limits["max_blocks"]
    if regs > 0:
        regs_per_warp = ceil_to(regs * 32, limits["reg_unit"])
        warps_per_partition = (limits["regs_per_sm"] // limits["sub_partitions"]) // regs_per_warp
        by_regs = warps_per_partition * limits["sub_partitions"] // warps
    by_shared = limits["max_blocks"]
    if shared_bytes > limits["shared_per_block"]:
        by_shared = 0
    elif shared_bytes > 0:
        by_shared = limits["shared_per_sm"] // (
            ceil_to(shared_bytes, limits["shared_unit"]) + limits["shared_reserved"]
        )
    blocks = min(by_warps, by_regs, by_shared, limits["max_blocks"])
    limiter = min(
        (("warps", by_warps), ("registers", by_regs), ("shared", by_shared), ("blocks", limits["max_blocks"])),
        key=lambda kv: kv[1],
    )[0]
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / limits["max_warps"], "limiter": limiter}


# ---------------------------------------------------------------------------------------------
# Tools and the library.


def tool(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    import sysconfig

    matches = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "bin", name))
    return matches[0] if matches else None


def find_library(explicit: Optional[str]) -> Optional[str]:
    if explicit:
        return explicit
    in_place = glob.glob(os.path.join(ROOT, "src", "ckbn", "_C*.so"))
    if in_place:
        return in_place[0]
    spec = importlib.util.find_spec("ckbn")  # finds the installed package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        installed = glob.glob(os.path.join(location, "_C*.so"))
        if installed:
            return installed[0]
    return None


def run(cmd: List[str], **kw) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw).stdout


def demangle(names: List[str]) -> Dict[str, str]:
    if not names:
        return {}
    out = run(["c++filt"], input="\n".join(names) + "\n").splitlines()
    return dict(zip(names, out))


def has_sm90_code(library: str, cuobjdump: str) -> bool:
    try:
        return "sm_90" in run([cuobjdump, "--list-elf", library])
    except subprocess.CalledProcessError:
        return False  # no fatbinary in a CPU-only build


# ---------------------------------------------------------------------------------------------
# 1 and 2: resource usage and SASS.


@dataclass
class Kernel:
    name: str  # demangled, anonymous namespaces unified
    base: str  # e.g. reduce_planes_kernel
    op: str  # e.g. GradReduction
    dtype: str  # scalar type of the data, "" if none
    vec: int  # trailing integer template argument (vector width), 1 if none
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    spill_instructions: int = 0
    threads: int = 512
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    limiter: str = ""
    loads: Dict[str, int] = field(default_factory=dict)
    stores: Dict[str, int] = field(default_factory=dict)
    loop_loads: Dict[str, int] = field(default_factory=dict)
    loop_stores: Dict[str, int] = field(default_factory=dict)
    # Peak bytes of global loads a thread has in flight in its streaming loops (see
    # peak_loads_in_flight), and how many loads that is.
    in_flight_bytes: int = 0
    in_flight_loads: int = 0
    problems: List[str] = field(default_factory=list)
    known: List[str] = field(default_factory=list)  # findings of KNOWN_LOCAL_MEMORY

    @property
    def streams(self) -> bool:
        """Walks full-size tensors (not a per-channel or merge kernel)."""
        return self.base.startswith(("reduce_", "elementwise_"))

    @property
    def element_bits(self) -> int:
        return SCALARS.get(self.dtype, 0)


ANON = re.compile(r"\(anonymous namespace\)::")


def unify(demangled: str) -> str:
    return ANON.sub("", demangled).replace("void ", "", 1) if demangled.startswith("void ") else ANON.sub("", demangled)


def head_of(name: str) -> str:
    """A demangled kernel name without its parameter list: up to the first "(" outside the template
    arguments (which hold casts such as ``(ckbn::math::Activation)1``)."""
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def describe(name: str) -> dict:
    """base name, op, data dtype and vector width from a demangled kernel name."""
    head = head_of(name)
    base = re.sub(r"<.*", "", head).split("::")[-1]
    args = head[len(head.split("<", 1)[0]) + 1 : -1] if "<" in head else ""
    op = re.sub(r"<.*", "", args).split("::")[-1].strip()
    dtype = next((m.group(0) for m in re.finditer(r"c10::Half|c10::BFloat16|double|float", args)), "")
    vec = re.search(r",\s*(\d+)>?$", args)
    return {"base": base, "op": op if op not in SCALARS else "", "dtype": dtype, "vec": int(vec.group(1)) if vec else 1}


def parse_resources(text: str) -> Dict[str, dict]:
    usage = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[current] = {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
            current = None
    return usage


def width_of(mnemonic: str, element_bits: int) -> str:
    parts = mnemonic.split(".")
    for bits in ("128", "64"):
        if bits in parts:
            return bits
    if any(p in ("U16", "S16") for p in parts):
        return "16"
    if any(p in ("U8", "S8") for p in parts):
        return "8"
    return "32"


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


REGISTER = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(\.64)?")


def is_partial_load(op: str) -> bool:
    """A global load that bypasses L1 (ld.global.cg, __ldcg): how the kernels read the partial
    states other blocks stored in the same launch."""
    parts = op.split(".")
    return parts[0] == "LDG" and "STRONG" in parts and "GPU" in parts


def registers(operand: str, width_bits: int = 32) -> set:
    """The general registers an operand names: R4.64 is R4 and R5; a destination of a wider load
    spans width_bits / 32 registers from the one named."""
    regs = set()
    for m in REGISTER.finditer(operand):
        first = int(m.group(1))
        span = 2 if m.group(2) else max(1, width_bits // 32)
        regs.update(range(first, first + span))
    return regs


def peak_loads_in_flight(body: List[tuple]) -> dict:
    """Bytes of global loads one thread has issued and not yet used, at most, over a loop body run
    twice (so that loads issued late in an iteration for the next one count): the loads a thread
    issues before it first needs a result, which is what hides memory latency. A load is used
    when an instruction reads any register it writes."""
    outstanding: List[tuple] = []  # (registers, bytes)
    peak = {"bytes": 0, "loads": 0}
    for _ in range(2):
        for _, op, operands in body:
            fields = [f.strip() for f in operands.split(",")] if operands else []
            kind = op.split(".")[0]
            stores = kind.startswith(("ST", "RED")) or kind in ("BRA", "EXIT", "BAR", "WARPSYNC")
            dest = fields[0] if fields and not stores and REGISTER.match(fields[0]) else None
            sources = set().union(*(registers(f) for f in (fields[1:] if dest else fields))) if fields else set()
            outstanding = [(regs, n) for regs, n in outstanding if not regs & sources]
            if kind == "LDG":
                bits = int(width_of(op, 0))
                outstanding.append((registers(dest, bits) if dest else set(), bits // 8))
                total = sum(n for _, n in outstanding)
                if total > peak["bytes"]:
                    peak = {"bytes": total, "loads": len(outstanding)}
            elif dest:  # a register overwritten unread: that load is no longer awaited
                written = registers(dest)
                outstanding = [(regs, n) for regs, n in outstanding if not regs & written]
    return peak


def loaded_bytes(code: List[tuple], loop: tuple) -> int:
    return sum(int(width_of(op, 0)) // 8 for a, op, _ in code if loop[0] <= a <= loop[1] and op.split(".")[0] == "LDG")


def streaming_loops(code: List[tuple], loops: List[tuple]) -> List[tuple]:
    """The innermost loops that load at least half as many bytes per iteration as the heaviest: the
    main loops of each phase of a kernel. Lighter ones (a unit loop a thread without elements runs,
    loading a channel's mean; a tail over leftover elements) are rarer and not judged."""
    heaviest = max((loaded_bytes(code, loop) for loop in loops), default=0)
    return [loop for loop in loops if heaviest and 2 * loaded_bytes(code, loop) >= heaviest]


def in_flight_of_loops(code: List[tuple], loops: List[tuple]) -> dict:
    """The streaming loops' figure: the smallest of their peaks of loads in flight."""
    peaks = [peak_loads_in_flight([ins for ins in code if lo <= ins[0] <= hi]) for lo, hi in loops]
    return min(peaks, key=lambda p: p["bytes"], default={"bytes": 0, "loads": 0})


def parse_sass(text: str) -> Dict[str, dict]:
    """Per function: global load/store widths, those in innermost loops, local-memory accesses."""
    functions: Dict[str, list] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = INSTRUCTION.search(line)
        if current is not None and m:
            current.append((int(m.group(1), 16), m.group(3), m.group(4)))
    result = {}
    for name, code in functions.items():
        # A backward branch closes a loop [target, branch]; innermost loops contain no other loop.
        loops = []
        for address, op, operands in code:
            if op.startswith("BRA"):
                t = re.search(r"0x([0-9a-f]+)", operands)
                if t and int(t.group(1), 16) <= address:
                    loops.append((int(t.group(1), 16), address))
        inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
        # Loops over per-channel data (a split reduction's merge of partial states, loaded past L1)
        # are not the streaming loops judged here.
        inner = [(lo, hi) for lo, hi in inner if not any(lo <= a <= hi and is_partial_load(op) for a, op, _ in code)]
        info = {"loads": {}, "stores": {}, "loop_loads": {}, "loop_stores": {}, "local": 0}
        inner = streaming_loops(code, inner)
        info["in_flight"] = in_flight_of_loops(code, inner)
        for address, op, _ in code:
            kind = op.split(".")[0]
            if kind in ("LDL", "STL"):
                info["local"] += 1
            if kind not in ("LDG", "STG"):
                continue
            width = width_of(op, 0)
            key = "loads" if kind == "LDG" else "stores"
            info[key][width] = info[key].get(width, 0) + 1
            if any(lo <= address <= hi for lo, hi in inner):
                info["loop_" + key][width] = info["loop_" + key].get(width, 0) + 1
        result[name] = info
    return result


def kernels_of(library: str, cuobjdump: str, nvdisasm_dir: Optional[str]) -> List[Kernel]:
    usage = parse_resources(run([cuobjdump, "-res-usage", library]))
    env = dict(os.environ)
    if nvdisasm_dir:
        env["PATH"] = nvdisasm_dir + os.pathsep + env.get("PATH", "")
    sass = parse_sass(run([cuobjdump, "-sass", library], env=env))
    names = demangle(sorted(usage))
    kernels: Dict[str, Kernel] = {}
    for mangled, res in usage.items():
        name = unify(names[mangled])
        if name in kernels:  # the same template in several translation units
            continue
        k = Kernel(name=name, **describe(name))
        k.regs, k.stack, k.local, k.shared = res["REG"], res["STACK"], res["LOCAL"], res["SHARED"]
        code = sass.get(mangled, {})
        k.spill_instructions = code.get("local", 0)
        for key in ("loads", "stores", "loop_loads", "loop_stores"):
            setattr(k, key, code.get(key, {}))
        flight = code.get("in_flight", {"bytes": 0, "loads": 0})
        k.in_flight_bytes, k.in_flight_loads = flight["bytes"], flight["loads"]
        kernels[name] = k
    return sorted(kernels.values(), key=lambda k: k.name)


# Findings known and not yet fixed, each with its reason. They are listed in the report as known,
# and do not fail --check; any other finding does. An entry is removed once its kernel is fixed.
#   (kernel, op, dtype, vector width) whose local memory is known:
KNOWN_LOCAL_MEMORY: Dict[tuple, str] = {}  # none at present
#   kernel families without a 128-bit hot loop, by design, as "kernel<op<dtype>>":
KNOWN_NARROW_FAMILIES: Dict[str, str] = {}  # none at present


def judge_kernel(k: Kernel, block_threads: int) -> None:
    k.threads = block_threads
    o = occupancy(k.regs, k.shared, block_threads)
    k.blocks_per_sm, k.occupancy, k.limiter = o["blocks_per_sm"], o["occupancy"], o["limiter"]
    if k.stack or k.local or k.spill_instructions:
        finding = f"local memory: stack {k.stack} B, local {k.local} B, {k.spill_instructions} LDL/STL"
        reason = KNOWN_LOCAL_MEMORY.get((k.base, k.op, k.dtype, k.vec))
        (k.known if reason else k.problems).append(finding + (f" (known: {reason})" if reason else ""))
    if k.streams and k.element_bits in (16, 32):
        designed = str(min(128, k.vec * k.element_bits))
        off = {w: n for w, n in {**k.loop_loads}.items() if w != designed}
        if off:
            k.problems.append(f"hot-loop loads {off} besides the designed {designed}-bit ones")
        if not k.loop_loads:
            k.problems.append("no global loads found in an innermost loop")


def families_without_wide_loads(kernels: List[Kernel]) -> List[str]:
    """Streaming fp32/fp16/bf16 kernels (kernel x op x dtype) with no instantiation whose hot loop
    loads 128 bits: with alignment, every one of them should have such a path."""
    families: Dict[tuple, bool] = {}
    for k in kernels:
        if k.streams and k.element_bits in (16, 32):
            key = (k.base, k.op, k.dtype)
            families[key] = families.get(key, False) or k.loop_loads.get("128", 0) > 0
    return [f"{b}<{o}<{d}>>" for (b, o, d), wide in sorted(families.items()) if not wide]


# ---------------------------------------------------------------------------------------------
# 3 and 4: the emulator.


def emulate(mode: str, extra_args: List[str], env_extra: Dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(os.environ, CKBN_BACKEND="reference", **env_extra)
        env.pop("CKBN_REQUIRE_EXTENSION", None)
        result = subprocess.run(
            [sys.executable, EMULATOR, mode, "--json", out, *extra_args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"emulator ({mode}) failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def design(op: str, launches: List[dict]) -> Optional[tuple]:
    """(reads, writes) of full-size tensors the design allows an operator, in tensor sizes, and
    the reads a single launch may repeat (a fused backward rereads x and dy from L2)."""
    touching = [launch for launch in launches if launch["large"]["read_distinct"] or launch["large"]["write_distinct"]]
    fused = len(touching) == 1
    return {
        "batch_stats": (1, 0),
        "normalize": (1, 1),
        "backward train": (2, 1) if fused else (4, 1),
        "backward eval grad_input": (2, 1),
        "backward eval grad_weight": (2, 0),
        "backward eval nothing": (0, 0),
        "backward_reduce": (2, 0),
        "backward_elemt": (2, 1),
        "update_running_stats": (0, 0),
    }.get(op)


def name_launches(sections: List[List[dict]]) -> None:
    """Replaces each launch's mangled host kernel name by its unified demangled name."""
    launches = [launch for rows in sections for row in rows for launch in row["launches"]]
    names = demangle(sorted({launch["kernel"] for launch in launches}))
    for launch in launches:
        launch["kernel"] = unify(names[launch["kernel"]])


def judge_traffic(cases: List[dict]) -> List[dict]:
    rows = []
    for c in cases:
        t = c["tensor_bytes"]
        launches = c["launches"]
        total = {
            k: sum(launch["large"][k] for launch in launches)
            for k in ("read", "write", "read_distinct", "write_distinct")
        }
        small = sum(launch["small"]["read_distinct"] + launch["small"]["write_distinct"] for launch in launches)
        # A split reduction's partial states and arrival counters: stored by its blocks, read back
        # by the last block of each tile, in the same launch.
        staging = sum(launch["staging"] for launch in launches)
        small = max(0, small - 2 * staging)
        allowed = design(c["op"], launches)
        problems = []
        if allowed is None:
            problems.append("no design entry")
        else:
            if total["read_distinct"] > allowed[0] * t or total["write_distinct"] > allowed[1] * t:
                problems.append(
                    f"moves {total['read_distinct'] / t:.2f} reads + {total['write_distinct'] / t:.2f} "
                    f"writes, design {allowed[0]} + {allowed[1]}"
                )
            for launch in launches:
                reuse = (
                    2
                    if launch["large"]["write_distinct"] and describe(launch["kernel"])["op"] == "GradReduction"
                    else 1
                )  # fused
                if (
                    launch["large"]["read"] > reuse * launch["large"]["read_distinct"]
                    or launch["large"]["write"] > launch["large"]["write_distinct"]
                ):
                    problems.append(f"{short(launch['kernel'])} accesses elements more than once per pass")
            if (
                sum(allowed) and small > SMALL_TOLERANCE * t
            ):  # operators on per-channel vectors only: nothing to compare
                problems.append(f"per-channel traffic {small} B exceeds {SMALL_TOLERANCE:.0%} of the tensor")
        rows.append(
            {
                "case": c["case"],
                "shape": c["shape"],
                "layout": c["layout"],
                "dtype": c["dtype"],
                "op": c["op"],
                "launches": len(launches),
                "kernels": [short(launch["kernel"]) for launch in launches],
                "reads": total["read_distinct"] / t,
                "writes": total["write_distinct"] / t,
                "accessed_reads": total["read"] / t,
                "per_channel_bytes": small,
                "staging_bytes": staging,
                "design": list(allowed) if allowed else None,
                "problems": problems,
            }
        )
    return rows


def short(name: str) -> str:
    """kernel<Op, vec> from a unified demangled name."""
    d = describe(name)
    return d["base"] + (f"<{d['op']}, {d['vec']}>" if d["op"] else "")


def resnet50_shapes(batch: int) -> List[tuple]:
    return [
        (batch, c, hw, hw)
        for c, hw in ((64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7))
    ]


def plan_spec() -> List[dict]:
    return [
        {"shape": list(s), "layout": layout, "dtype": dtype}
        for batch in (32, 256)
        for s in resnet50_shapes(batch)
        for dtype in ("float32", "float16", "bfloat16")
        for layout in ("planes", "last")
    ]


def wave_fill(blocks: int, capacity: int) -> tuple:
    """Waves of `blocks` over `capacity` resident block slots, and how full the last one is."""
    if not capacity:
        return float("inf"), 0.0
    return blocks / capacity, (blocks - (math.ceil(blocks / capacity) - 1) * capacity) / capacity


def judge_plans(plans: List[dict], kernels: Dict[str, Kernel]) -> List[dict]:
    rows = []
    for p in plans:
        for launch in p["launches"]:
            k = kernels.get(launch["kernel"])
            threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
            blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
            per_sm = occupancy(k.regs, k.shared + launch["shared_bytes"], threads)["blocks_per_sm"] if k else 0
            waves, last = wave_fill(blocks, H100["sms"] * per_sm)
            designed = wave_fill(blocks, H100["sms"] * min(per_sm, DESIGN_BLOCKS_PER_SM))
            streams = short(launch["kernel"]).startswith(("reduce_", "elementwise_"))
            # The emulator's grid_stride: 1, blocks take several units; 0, the kernel loops over units but
            # each block has one; -1, its arguments have no units (not a grid-stride kernel).
            grid_stride = launch.get("grid_stride", -1) >= 0
            problems = []
            if k is None:
                problems.append("kernel not found in the sm_90 code")
            elif streams and not any(
                (w >= MIN_WAVES or grid_stride) and f >= MIN_LAST_FILL for w, f in ((waves, last), designed)
            ):
                # Judged at the kernel's occupancy, or at the designed one: a kernel lighter than its
                # register budget gets more block slots than a whole-channel plan can always fill.
                problems.append(f"{waves:.2f} waves, last {last:.0%} full")
            rows.append(
                {
                    "shape": p["shape"],
                    "layout": p["layout"],
                    "dtype": p["dtype"],
                    "op": p["op"],
                    "kernel": short(launch["kernel"]),
                    "grid": launch["grid"],
                    "block": launch["block"],
                    "blocks": blocks,
                    "blocks_per_sm": per_sm,
                    "waves": waves,
                    "last_wave_fill": last,
                    "grid_stride": grid_stride,
                    "units_per_block_above_1": launch.get("grid_stride", -1) == 1,
                    "checked": streams,
                    "problems": problems,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# 5: the targets of every ResNet-50 training shape: bytes in flight, launches and passes per op.

# By Little's law an H100/H200 streams at full bandwidth with about 4.8 TB/s x 700 ns / 132 SMs
# = 25 KB of loads in flight per SM; the target leaves a margin.
IN_FLIGHT_TARGET = 32 * 1024
# Launches moving less than this (0.5 to 2 us of HBM time) are reported but not judged: they are
# bound by their fixed costs, which the launch count judges.
IN_FLIGHT_MIN_BYTES = 8 * 10**6
LAUNCH_TARGETS = {"forward": 2, "replay": 1, "backward": 2}
# Passes over full-size tensors (reads, writes) the design targets: the forward reads x twice (its
# statistics, then y), replay once, the backward reads x and dy once each (a fused kernel's second
# sweep hits L2) and writes grad_input.
PASS_TARGETS = {"forward": (2, 1), "replay": (1, 1), "backward": (2, 1)}
# Targets known not to be met yet, by (target, op, layout) or (target, op, layout, dtype): the
# reason. Listed in the report as known, not counted as failing; an entry is removed once its
# shapes meet the target.
_TWO_KERNEL_BACKWARD = (
    "a reduction, then grad_input (x and dy read twice): one kernel that splits a channel's rows over "
    "blocks must hold every block of a tile until its sums are merged, a cooperative launch that the "
    "emulator cannot run yet (it runs blocks one after another)"
)
_SIXTEEN_BIT_LANES = (
    "32 bytes a thread (one 128-bit load per input and row) at two blocks of 512 threads per SM is 32 KB "
    "only when the grid fills all 264 block slots; these grids leave a few empty (the rows of a tile split "
    "into a whole number of units), 31.5 to 32 KB. 64 bytes a thread spill at the 64-register budget: 8 "
    "half lanes become 8 floats per row"
)
# The in-flight entry covers only the figures it explains: within 2% of the target.
_SIXTEEN_BIT_LANES_SHORT = (_SIXTEEN_BIT_LANES, 0.98 * IN_FLIGHT_TARGET)
KNOWN_TARGET_MISSES: Dict[tuple, object] = {
    ("passes", "backward", "last"): "the channels_last backward is "
    + _TWO_KERNEL_BACKWARD
    + "; a kernel holding whole channels has only ceil(C / 256) channel tiles to spread over 132 SMs",
    ("passes", "backward", "planes"): "the backward fuses only when the blocks resident at once keep their "
    "whole channels in L2 (fuse_backward); otherwise it is " + _TWO_KERNEL_BACKWARD,
    **{
        ("in_flight", op, layout, dtype): _SIXTEEN_BIT_LANES_SHORT
        for op in ("forward", "replay", "backward")
        for layout in ("last", "planes")
        for dtype in ("float16", "bfloat16")
    },
}


def known_target_miss(
    target: str, family: str, layout: str, dtype: str, figure: float = 0, kernel: str = ""
) -> Optional[str]:
    """The reason a miss is known, if it is: an entry is a reason, or (reason, the least figure it
    explains); the most specific key that has an entry decides (with the kernel, with the dtype,
    without)."""
    keys = [(target, family, layout, dtype, kernel), (target, family, layout, dtype), (target, family, layout)]
    entry = next((KNOWN_TARGET_MISSES[k] for k in keys if k in KNOWN_TARGET_MISSES), None)
    if isinstance(entry, tuple):
        reason, floor = entry
        return reason if figure >= floor else None
    return entry


def launch_passes(kernel: str, inputs_bytes: int) -> tuple:
    """(reads, writes) of full-size tensors one launch of `kernel` makes, by what it is."""
    d = describe(kernel)
    if d["base"].startswith("reduce_"):
        fused = d["op"] == "GradReduction" and ", true>" in kernel
        return (2, 1) if fused else ((2, 0) if d["op"] == "GradReduction" else (1, 0))
    if d["base"].startswith("elementwise_"):
        return (2, 1) if d["op"] == "BackwardElementwise" else (1, 1)
    return (0, 0)


def busy_lanes(kernel: str, shape: List[int], block: List[int]) -> float:
    """The share of a block's x-lanes that have elements in its streaming loop, by the kernel's
    walk: planes step block_x vectors along S, rows block_x vectors across C (its tiles), a flat
    run has no idle lanes (but its last unit). Reported beside the bytes in flight, which count
    every resident thread (the target's definition), not judged."""
    d = describe(kernel)
    if "flat" in d["base"]:
        return 1.0
    contiguous = math.prod(shape[2:]) if d["base"].endswith("planes_kernel") else shape[1]
    vectors = max(1, contiguous // d["vec"])
    lanes = max(1, block[0])
    return vectors / (math.ceil(vectors / lanes) * lanes)


def judge_targets(plans: List[dict], kernels: Dict[str, Kernel]) -> List[dict]:
    """Per ResNet-50 shape, layout and dtype, and per training op (forward, replay, backward): the
    launches, the passes over full-size tensors and, per launch, the bytes of loads in flight per
    SM, against the targets."""
    by_case: Dict[tuple, Dict[str, List[dict]]] = {}
    for p in plans:
        key = (tuple(p["shape"]), p["layout"], p["dtype"])
        by_case.setdefault(key, {})[p["op"]] = p["launches"]
    rows = []
    for (shape, layout, dtype), ops in by_case.items():
        element = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
        tensor = math.prod(shape) * element
        families = {
            "forward": ops.get("batch_stats", []) + ops.get("normalize", []),
            "replay": ops.get("normalize", []),
            "backward": ops.get("backward train", []),
        }
        for family, launches in families.items():
            per_launch = []
            reads = writes = 0
            for launch in launches:
                k = kernels.get(launch["kernel"])
                r, w = launch_passes(launch["kernel"], tensor)
                reads, writes = reads + r, writes + w
                threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
                blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
                per_sm = occupancy(k.regs, k.shared + launch["shared_bytes"], threads)["blocks_per_sm"] if k else 0
                resident = min(per_sm, blocks / H100["sms"])
                flight = (k.in_flight_bytes if k else 0) * threads * resident
                moved = (r + w) * tensor
                per_launch.append(
                    {
                        "kernel": short(launch["kernel"]),
                        "moves_bytes": moved,
                        "in_flight_per_sm": flight,
                        "busy_lanes": busy_lanes(launch["kernel"], list(shape), launch["block"]),
                        "judged": moved > IN_FLIGHT_MIN_BYTES,
                    }
                )
            problems, known = [], []

            def miss(target: str, text: str, figure: float = 0, kernel: str = "") -> None:
                reason = known_target_miss(target, family, layout, dtype, figure, kernel)
                (known if reason else problems).append(text + (f" (known: {reason})" if reason else ""))

            if len(launches) > LAUNCH_TARGETS[family]:
                miss("launches", f"{len(launches)} launches, target {LAUNCH_TARGETS[family]}")
            target_r, target_w = PASS_TARGETS[family]
            if reads > target_r or writes > target_w:
                miss("passes", f"{reads} reads + {writes} writes, target {target_r} + {target_w}")
            for item in per_launch:
                if item["judged"] and item["in_flight_per_sm"] < IN_FLIGHT_TARGET:
                    miss(
                        "in_flight",
                        f"{item['kernel']}: {item['in_flight_per_sm'] / 1024:.0f} KB in flight per SM, "
                        f"target {IN_FLIGHT_TARGET // 1024} KB",
                        item["in_flight_per_sm"],
                        item["kernel"],
                    )
            rows.append(
                {
                    "shape": list(shape),
                    "layout": layout,
                    "dtype": dtype,
                    "family": family,
                    "launches": len(launches),
                    "reads": reads,
                    "writes": writes,
                    "per_launch": per_launch,
                    "min_in_flight_judged": min(
                        (i["in_flight_per_sm"] for i in per_launch if i["judged"]), default=None
                    ),
                    "problems": problems,
                    "known": known,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Report.


def table(head: List[str], rows: List[list]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]


def widths(d: Dict[str, int]) -> str:
    return " ".join(f"{w}b:{n}" for w, n in sorted(d.items(), key=lambda kv: -int(kv[0]))) or "-"


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"# ckbn GPU static model, sm_90 ({report['date']})",
        "",
        "**A static model computed without a GPU, not a GPU measurement.** Resource usage and SASS come from "
        "the sm_90 code in the built ckbn._C (cuobjdump); traffic and launch plans come from the host emulator "
        "of tests/cuda_emulation, which runs the real host code and kernels on the CPU; occupancy and waves are "
        f"computed for an {H100['name']} ({H100['sms']} SMs, {H100['l2_bytes'] >> 20} MB L2).",
        "",
        "## Summary",
        "",
    ]
    lines += table(
        ["check", "items", "failing", "known, not yet fixed", "verdict"],
        [
            [name, v["items"], v["failing"], v.get("known", 0), "PASS" if v["failing"] == 0 else "FAIL"]
            for name, v in s.items()
        ],
    )
    lines += ["", f"library: `{report['library']}`", ""]
    problems = [
        p
        for section in ("kernels", "traffic", "plans", "targets")
        for r in report.get(section, [])
        for p in (
            f"{section}: {head_of(r.get('name') or r.get('op') or r.get('family'))} {r.get('shape', '')} "
            f"{r.get('layout', '')} "
            f"{'' if 'name' in r else r.get('dtype', '')}: {q}"
            for q in r["problems"]
        )
    ]
    problems += [f"kernels: no 128-bit hot-loop path: {f}" for f in report.get("families_without_wide_loads", [])]
    if problems:
        lines += ["### Failing items", ""] + [f"- {p}" for p in problems[:60]] + [""]
    if report.get("known_findings"):
        lines += ["### Known findings, not yet fixed (not counted as failing; see KNOWN_* in bench/gpu_static.py)", ""]
        lines += [f"- {p}" for p in report["known_findings"]] + [""]
    lines += [
        "## Kernels (sm_90)",
        "",
        "Occupancy: blocks per SM = min(64 warps / warps per block, 32, register limit, shared limit); "
        "registers per warp = ceil(regs x 32 / 256) x 256, each of the 4 sub-partitions holds "
        "floor(16384 / that) warps; shared per block = ceil(bytes / 128) x 128 + 1 KB reserved, "
        "of 228 KB per SM. Block size 512 threads unless a launch says otherwise. Loads/stores: global "
        "instructions by width in bits (all, and in innermost loops).",
        "",
    ]
    lines += table(
        [
            "kernel",
            "regs",
            "stack",
            "LDL/STL",
            "shared",
            "blocks/SM",
            "occupancy",
            "loads",
            "hot-loop loads",
            "stores",
            "ok",
        ],
        [
            [
                head_of(k["name"]),
                k["regs"],
                k["stack"],
                k["spill_instructions"],
                k["shared"],
                k["blocks_per_sm"],
                f"{k['occupancy']:.0%}",
                widths(k["loads"]),
                widths(k["loop_loads"]),
                widths(k["stores"]),
                "yes" if not k["problems"] else "NO",
            ]
            for k in report["kernels"]
        ],
    )
    if report.get("traffic"):
        lines += [
            "",
            "## Global-memory traffic per operator (emulator)",
            "",
            "Bytes of full-size tensors each operator's kernels read and write, in tensor sizes: distinct bytes "
            "per launch (what DRAM moves when caches hold what a launch reuses), against the design. Per-channel "
            f"vectors are counted apart and allowed {SMALL_TOLERANCE:.0%} of a tensor; the partial states of a "
            "split reduction (written once, read once by finalize) are listed apart.",
            "",
        ]
        lines += table(
            ["case", "dtype", "op", "kernels", "reads", "writes", "design r+w", "per-channel B", "staging B", "ok"],
            [
                [
                    r["case"],
                    r["dtype"],
                    r["op"],
                    " + ".join(r["kernels"]),
                    f"{r['reads']:.2f}",
                    f"{r['writes']:.2f}",
                    "+".join(map(str, r["design"] or [])),
                    r["per_channel_bytes"],
                    r["staging_bytes"],
                    "yes" if not r["problems"] else "NO",
                ]
                for r in report["traffic"]
            ],
        )
    if report.get("plans"):
        lines += [
            "",
            f"## Launch plans, ResNet-50 BatchNorm shapes on {H100['name']} ({H100['sms']} SMs)",
            "",
            f"Streaming kernels must make at least {MIN_WAVES} waves, or loop over their work units (grid-stride), "
            f"with a last wave at least {MIN_LAST_FILL:.0%} full; per-channel kernels (finalize) are listed, not "
            "judged. grid-stride: yes, blocks take several units; 1 unit, the kernel loops over units and the "
            "plan gives each block one.",
            "",
        ]
        lines += table(
            [
                "shape",
                "layout",
                "dtype",
                "op",
                "kernel",
                "grid",
                "block",
                "blocks/SM",
                "waves",
                "last wave",
                "grid-stride",
                "ok",
            ],
            [
                [
                    "x".join(map(str, r["shape"])),
                    r["layout"],
                    r["dtype"],
                    r["op"],
                    r["kernel"],
                    "x".join(map(str, r["grid"])),
                    "x".join(map(str, r["block"])),
                    r["blocks_per_sm"],
                    f"{r['waves']:.2f}",
                    f"{r['last_wave_fill']:.0%}",
                    ("yes" if r["units_per_block_above_1"] else "1 unit") if r["grid_stride"] else "no",
                    ("yes" if not r["problems"] else "NO") if r["checked"] else "-",
                ]
                for r in report["plans"]
            ],
        )
    if report.get("targets"):
        lines += [
            "",
            f"## Targets per training op, ResNet-50 BatchNorm shapes on {H100['name']}",
            "",
            f"Launches per op (target: forward {LAUNCH_TARGETS['forward']}, replay {LAUNCH_TARGETS['replay']}, "
            f"backward {LAUNCH_TARGETS['backward']}; the forward's running-statistics update is one more launch, "
            f"{report.get('running_stats_launches', 0)} here), passes over full-size tensors (reads + writes; "
            "target forward 2 + 1, replay 1 + 1, backward 2 + 1) and, for every launch moving more than "
            f"{IN_FLIGHT_MIN_BYTES / 1e6:.0f} MB, the bytes of loads in flight per SM (target "
            f"{IN_FLIGHT_TARGET // 1024} KB): the peak a thread of the kernel's streaming loop has issued before "
            "it needs one (from the SASS) x threads per block x blocks resident per SM (occupancy, at most the "
            "grid's share). Per shape family: the worst shape.",
            "",
        ]
        families: Dict[tuple, List[dict]] = {}
        for r in report["targets"]:
            families.setdefault((r["family"], r["layout"], r["dtype"]), []).append(r)
        summary_rows = []
        for (family, layout, dtype), rs in sorted(families.items()):
            judged = [r["min_in_flight_judged"] for r in rs if r["min_in_flight_judged"] is not None]
            busy = [i["busy_lanes"] for r in rs for i in r["per_launch"] if i["judged"] and "busy_lanes" in i]
            summary_rows.append(
                [
                    family,
                    layout,
                    dtype,
                    max(r["launches"] for r in rs),
                    max(f"{r['reads']} + {r['writes']}" for r in rs),
                    f"{min(judged) / 1024:.0f} KB" if judged else "-",
                    f"{min(busy):.0%}" if busy else "-",
                    sum(1 for r in rs if not r["problems"] and not r["known"]),
                    sum(1 for r in rs if r["known"] and not r["problems"]),
                    sum(1 for r in rs if r["problems"]),
                ]
            )
        lines += table(
            [
                "op",
                "layout",
                "dtype",
                "launches (max)",
                "passes (max)",
                "in flight per SM (min, judged)",
                "x-lanes busy (min, judged; not a target)",
                "shapes meeting all",
                "known misses",
                "failing",
            ],
            summary_rows,
        )
        lines += ["", "Per shape:", ""]
        lines += table(
            [
                "shape",
                "layout",
                "dtype",
                "op",
                "launches",
                "passes",
                "in flight per SM by launch (MB moved; x-lanes busy, if not all)",
                "ok",
            ],
            [
                [
                    "x".join(map(str, r["shape"])),
                    r["layout"],
                    r["dtype"],
                    r["family"],
                    r["launches"],
                    f"{r['reads']} + {r['writes']}",
                    "; ".join(
                        f"{i['kernel']} {i['in_flight_per_sm'] / 1024:.0f} KB ({i['moves_bytes'] / 1e6:.1f}"
                        + (f"; {i['busy_lanes']:.0%} busy" if i.get("busy_lanes", 1) < 1 else "")
                        + ")"
                        for i in r["per_launch"]
                    ),
                    "yes" if not r["problems"] and not r["known"] else ("known" if not r["problems"] else "NO"),
                ]
                for r in report["targets"]
            ],
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any check fails")
    parser.add_argument("--library", help="path of ckbn._C (default: the in-place build, else the installed one)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="directory of the report")
    parser.add_argument("--no-emulator", action="store_true", help="skip traffic and launch plans")
    parser.add_argument("--traffic-only", action="store_true", help="only the emulator's traffic (no report file)")
    args = parser.parse_args(argv)
    if args.traffic_only:
        traffic = emulate("traffic", [], {})["cases"]
        name_launches([traffic])
        rows = judge_traffic(traffic)
        for r in rows:
            print(
                f"{'ok  ' if not r['problems'] else 'FAIL'} {r['case']} {r['dtype']} {r['op']}: "
                f"reads {r['reads']:.2f}, "
                f"writes {r['writes']:.2f}, design {r['design']}" + "".join(f"; {p}" for p in r["problems"])
            )
        return 1 if args.check and any(r["problems"] for r in rows) else 0

    cuobjdump, nvdisasm = tool("cuobjdump"), tool("nvdisasm")
    library = find_library(args.library)
    if not cuobjdump or not nvdisasm:
        print(
            "gpu_static: needs cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)",
            file=sys.stderr,
        )
        return 2
    if not library or not has_sm90_code(library, cuobjdump):
        print(
            f"gpu_static: no sm_90 code in {library or 'ckbn._C (not found)'}: build with CKBN_CUDA=1 "
            "TORCH_CUDA_ARCH_LIST=9.0",
            file=sys.stderr,
        )
        return 3

    kernels = kernels_of(library, cuobjdump, os.path.dirname(nvdisasm))
    for k in kernels:
        judge_kernel(k, BLOCK_THREADS)
    narrow = families_without_wide_loads(kernels)
    narrow_families = [f for f in narrow if f not in KNOWN_NARROW_FAMILIES]
    known = [f"{head_of(k.name)}: {finding}" for k in kernels for finding in k.known]
    known += [
        f"no 128-bit hot-loop path: {f} (known: {KNOWN_NARROW_FAMILIES[f]})"
        for f in narrow
        if f in KNOWN_NARROW_FAMILIES
    ]
    report = {
        "date": datetime.date.today().isoformat(),
        "library": os.path.relpath(library, ROOT),
        "model": "static (cuobjdump + emulator), not a GPU measurement",
        "limits": SM90,
        "device": H100,
        "kernels": [dict(asdict(k)) for k in kernels],
        "families_without_wide_loads": narrow_families,
        "known_findings": known,
    }

    if not args.no_emulator:
        traffic = emulate("traffic", [], {})["cases"]  # builds the emulator library on first use
        by_name = {k.name: k for k in kernels}
        with tempfile.TemporaryDirectory() as tmp:
            spec, occ = os.path.join(tmp, "spec.json"), os.path.join(tmp, "occupancy.json")
            with open(spec, "w") as f:
                json.dump(plan_spec(), f)
            host_names = demangle(sorted(emulator_kernel_symbols()))
            with open(occ, "w") as f:
                json.dump({m: by_name[unify(d)].blocks_per_sm for m, d in host_names.items() if unify(d) in by_name}, f)
            plans = emulate(
                "plans",
                ["--shapes", spec, "--occupancy", occ],
                {"CKBN_EMULATED_SMS": str(H100["sms"]), "CKBN_EMULATED_L2_BYTES": str(H100["l2_bytes"])},
            )
        name_launches([traffic, plans["plans"]])
        report["traffic"] = judge_traffic(traffic)
        report["plans"] = judge_plans(plans["plans"], by_name)
        report["targets"] = judge_targets(plans["plans"], by_name)
        report["running_stats_launches"] = max(
            (len(p["launches"]) for p in plans["plans"] if p["op"] == "update_running_stats"), default=0
        )

    def count(rows, failing):
        return {"items": len(rows), "failing": sum(1 for r in rows if failing(r))}

    ks = report["kernels"]
    summary = {
        "kernels without spills or local memory": {
            **count(ks, lambda k: any(p.startswith("local") for p in k["problems"])),
            "known": sum(1 for k in ks if k["known"]),
        },
        "hot loops at their designed load width": count(
            ks, lambda k: any("hot-loop" in p or "no global loads" in p for p in k["problems"])
        ),
        "kernel families with a 128-bit hot loop": {
            "items": len(
                {
                    (k["base"], k["op"], k["dtype"])
                    for k in ks
                    if k["base"].startswith(("reduce_", "elementwise_")) and SCALARS.get(k["dtype"]) in (16, 32)
                }
            ),
            "failing": len(narrow_families),
            "known": len(narrow) - len(narrow_families),
        },
    }
    if "traffic" in report:
        summary["operators within their designed traffic"] = count(report["traffic"], lambda r: r["problems"])
        checked = [r for r in report["plans"] if r["checked"]]
        summary[f"ResNet-50 launches filling {H100['sms']} SMs"] = count(checked, lambda r: r["problems"])
        targets = report["targets"]
        for name, word in (
            ("launches", "launches"),
            ("passes", "reads +"),
            ("in flight", "in flight"),
        ):
            summary[f"ResNet-50 training ops meeting the {name} target"] = {
                "items": len(targets),
                "failing": sum(1 for r in targets if any(word in p for p in r["problems"])),
                "known": sum(1 for r in targets if any(word in p for p in r["known"])),
            }
    report["summary"] = summary
    report["known_findings"] += [
        f"targets: {r['family']} {'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype']}: {q}"
        for r in report.get("targets", [])
        for q in r["known"]
    ]
    failed = any(v["failing"] for v in summary.values())

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gpu-static-{report['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print("\n".join(text.split("\n## Kernels")[0].splitlines()))
    print(f"written: {stem}.md, {stem}.json")
    return 1 if failed and args.check else 0


def emulator_kernel_symbols() -> List[str]:
    """Mangled names of the kernels in the emulator library."""
    sys.path.insert(0, os.path.dirname(EMULATOR))
    import traffic  # noqa: E402  (tests/cuda_emulation/traffic.py; loads nothing on import)

    return list(traffic.kernel_symbols(traffic.library_path()).values())


if __name__ == "__main__":
    sys.exit(main())
