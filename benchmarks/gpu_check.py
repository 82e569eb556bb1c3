"""The check of in-process GPU use and GPU memory that follows the binding, on a real GPU host.

    .venv/bin/python benchmarks/gpu_check.py [--gb 20] [--skip-kernel]

CI has no GPU; this is the one short script to run where there is one (an H200 machine is
sometimes lent for it). Without a GPU it says so and exits with status 2; a failed check exits
with 1; all checks passed, 0. It checks, printing each result:

1. **Discovery**: the GPUs NVML finds (what the host daemon reports), and that the CUDA driver
   initialised at kernel start (``kernel._cuda.init_driver``) numbers them the same way.
2. **Copy peak**: host↔device copy bandwidth of this machine (pinned and pageable host memory,
   1 GiB, best of 3), the yardstick for the next step.
3. **Evict and restore** a model of ``--gb`` GB of float32 parameters (plus a small model with
   an Adam optimizer): ``NamespaceDeviceMemory.evict`` to host memory, then ``begin_cell`` onto
   the last GPU (another device when there are two). Values must be bitwise identical after
   the round trip, every parameter must be the same object, the optimizer must still hold the
   model's parameters, and the device's allocated memory must drop. Eviction and restore
   throughput (GB/s) are printed beside the copy peak.
4. **A replica kernel** (``python -m nbcluster.kernel``, driven as the gateway drives it): a
   cell bound to GPU 0 that is the first to use CUDA still leaves every device visible to the
   process and allocates on GPU 0; a cell bound to the last GPU allocates there (``.cuda()``)
   and gets the earlier cell's tensor moved onto it; ``nbcluster_evict_request`` frees it; the
   next bound cell says "[nbcluster] moved ... to GPU ..." and finds the same values; each
   reply carries ``nbcluster.device_memory``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 1024**3
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def no_gpu(reason: str) -> None:
    print(f"gpu_check: no GPU to check on this machine ({reason}); nothing was checked.")
    sys.exit(2)


# -- 1. discovery --------------------------------------------------------------------------------


def discovery() -> list[Any]:
    from nbcluster.host._resources import discover_nvml_gpus
    from nbcluster.kernel._cuda import init_driver, numbering
    from nbcluster.kernel._gpus import use_nvml_device_order

    gpus = discover_nvml_gpus()
    if not gpus:
        no_gpu("NVML found no NVIDIA driver or no device")
    print("1. discovery (NVML)")
    for gpu in gpus:
        print(f"     GPU {gpu.index}: {gpu.name}, {gpu.memory_mb / 1024:.0f} GiB, {gpu.uuid}")
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    use_nvml_device_order()
    check(init_driver(), "cuInit(0) through libcuda.so.1")
    check(numbering().ordinal(gpus[-1].index) == gpus[-1].index, "CUDA ordinal = NVML index")
    try:
        import torch
    except ImportError:
        no_gpu("torch is not installed")
    if not torch.cuda.is_available():
        no_gpu("this torch build cannot use CUDA")
    count = torch.cuda.device_count()
    check(count == len(gpus), f"torch sees {count} devices, NVML {len(gpus)}")
    for gpu in gpus:
        props = torch.cuda.get_device_properties(gpu.index)
        digits = re.sub("[^0-9a-f]", "", str(getattr(props, "uuid", "")).lower())
        same = not digits or digits in re.sub("[^0-9a-f]", "", gpu.uuid.lower())
        check(same, f"cuda:{gpu.index} is NVML's GPU {gpu.index} ({props.name})")
    return gpus


# -- 2. the copy peak ----------------------------------------------------------------------------


def copy_peak(device: int) -> dict[str, float]:
    import torch

    print("2. host <-> device copy peak (1 GiB, best of 3)")
    size = GiB
    on_device = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device}")
    peaks: dict[str, float] = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        for direction in ("H2D", "D2H"):
            best = float("inf")
            for _ in range(3):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                if direction == "H2D":
                    on_device.copy_(host, non_blocking=pinned)
                else:
                    host.copy_(on_device, non_blocking=pinned)
                torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
            peaks[f"{direction} {kind}"] = size / best / 1e9
            print(f"     {direction} {kind:8s} {size / best / 1e9:6.1f} GB/s")
        del host
    del on_device
    torch.cuda.empty_cache()
    return peaks


# -- 3. evict and restore a large model ----------------------------------------------------------


def evict_and_restore(gb: float, source: int, target: int, peaks: dict[str, float]) -> None:
    import torch

    from nbcluster.kernel._device_memory import NamespaceDeviceMemory, default_frameworks

    print(f"3. evict and restore a {gb:.0f} GB model (GPU {source} -> host -> GPU {target})")
    torch.cuda.set_device(source)
    width = 8192  # one layer: 8192 x 8192 float32 = 268 MB
    layers = max(1, round(gb * 1e9 / (width * width * 4)))
    model = torch.nn.Sequential(
        *(torch.nn.Linear(width, width, bias=False, device=f"cuda:{source}") for _ in range(layers))
    )
    small = torch.nn.Linear(256, 256, device=f"cuda:{source}")
    optimizer = torch.optim.Adam(small.parameters())
    small(torch.randn(4, 256, device=f"cuda:{source}")).sum().backward()
    optimizer.step()
    namespace: dict[str, Any] = {"model": model, "small": small, "optimizer": optimizer}
    params = list(model.parameters()) + list(small.parameters())
    reference = [p.detach().cpu() for p in params]
    state = [t.detach().cpu() for s in optimizer.state.values() for t in s.values()]
    memory = NamespaceDeviceMemory(lambda: namespace.values(), default_frameworks)

    held = memory.held()
    nbytes = sum(p.untyped_storage().nbytes() for p in params)
    check(
        held.get(source, 0) >= nbytes, f"held on GPU {source}: {held.get(source, 0) / 1e9:.1f} GB"
    )
    allocated = torch.cuda.memory_allocated(source)
    evicted = memory.evict([source])
    after = torch.cuda.memory_allocated(source)
    check(memory.held() == {}, "nothing held on a device after the eviction")
    check(
        allocated - after >= nbytes,
        f"GPU {source} allocated {allocated / 1e9:.1f} -> {after / 1e9:.1f} GB "
        f"(reserved now {torch.cuda.memory_reserved(source) / 1e9:.1f} GB)",
    )
    evict_rate = evicted.freed_bytes / evicted.seconds / 1e9
    print(
        f"     evicted {evicted.freed_bytes / 1e9:.1f} GB, {evicted.moved_objects} tensors in "
        f"{evicted.seconds:.2f} s: {evict_rate:.1f} GB/s "
        f"(peak D2H pinned {peaks['D2H pinned']:.1f}, pageable {peaks['D2H pageable']:.1f})"
    )
    restored = memory.begin_cell((target,))
    memory.end_cell()
    check(restored is not None, "restored before the bound cell")
    if restored is not None:
        rate = restored.bytes / restored.seconds / 1e9
        print(
            f"     restored {restored.bytes / 1e9:.1f} GB in {restored.seconds:.2f} s: "
            f"{rate:.1f} GB/s (peak H2D pinned {peaks['H2D pinned']:.1f}, "
            f"pageable {peaks['H2D pageable']:.1f})"
        )
    check(
        all(p.device == torch.device("cuda", target) for p in params),
        f"every parameter on cuda:{target}",
    )
    again = list(model.parameters()) + list(small.parameters())
    check(all(a is b for a, b in zip(again, params, strict=True)), "the same parameter objects")
    check(
        all(
            a is b
            for a, b in zip(optimizer.param_groups[0]["params"], small.parameters(), strict=True)
        ),
        "the optimizer holds the model's own parameters",
    )
    check(
        all(torch.equal(p.detach().cpu(), r) for p, r in zip(params, reference, strict=True)),
        "parameters bitwise identical after the round trip",
    )
    now = [t.detach().cpu() for s in optimizer.state.values() for t in s.values()]
    check(
        all(torch.equal(a, b) for a, b in zip(now, state, strict=True)),
        "optimizer state identical",
    )
    small(torch.randn(4, 256, device=f"cuda:{target}")).sum().backward()
    optimizer.step()
    check(True, "the optimizer steps on the restored device")
    namespace.clear()
    del model, small, optimizer, params, again, reference
    torch.cuda.empty_cache()


# -- 4. a replica kernel -------------------------------------------------------------------------


def replica_kernel(first: int, last: int, count: int) -> None:
    from jupyter_client.blocking import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    from nbcluster.protocol import EvictReply, EvictRequest, parse_reply, read_device_memory

    print(f"4. a replica kernel (cells bound to GPU {first}, then GPU {last})")
    folder = tempfile.mkdtemp()
    connection_file = str(Path(folder) / "kernel.json")
    write_connection_file(connection_file, ip="127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nbcluster.kernel", "-f", connection_file],
        env=env | {"NBCLUSTER_KERNEL_ID": "gpu-check", "NBCLUSTER_REPLICA_ID": "r1"},
    )
    client = BlockingKernelClient(connection_file=connection_file)
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)

        def ask(channel: str, msg_type: str, content: Any, meta: Any = None) -> dict[str, Any]:
            msg = client.session.msg(msg_type, content, metadata=meta or {})
            getattr(client, f"{channel}_channel").send(msg)
            while True:
                reply = getattr(client, f"get_{channel}_msg")(timeout=300)
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    return dict(reply["content"])

        def cell(code: str, gpus: list[int]) -> tuple[dict[str, Any], str, str]:
            content = {"code": code, "silent": False}
            msg = client.session.msg(
                "execute_request", content, metadata={"nbcluster": {"gpus": gpus}}
            )
            client.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
            while True:
                reply = client.get_shell_msg(timeout=300)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            out = {"stdout": "", "stderr": ""}
            while True:
                io = client.get_iopub_msg(timeout=300)
                if io["parent_header"].get("msg_id") != msg_id:
                    continue
                if io["msg_type"] == "stream":
                    out[io["content"]["name"]] += io["content"]["text"]
                if io["msg_type"] == "error":
                    out["stderr"] += "\n".join(io["content"]["traceback"])
                if io["msg_type"] == "status" and io["content"]["execution_state"] == "idle":
                    return dict(reply["content"]), out["stdout"].strip(), out["stderr"]

        reply, out, err = cell(
            "import os, torch\n"
            "x = torch.arange(1_000_000, dtype=torch.float32).cuda()\n"
            "print(x.device, torch.cuda.device_count(), os.environ['CUDA_VISIBLE_DEVICES'])",
            [first],
        )
        check(reply["status"] == "ok", f"first CUDA cell ran ({err.strip()[-200:]})")
        check(
            out == f"cuda:{first} {count} {first}", f"'.cuda()' in a cell bound to {first}: {out}"
        )
        memory = read_device_memory(reply)
        check(
            memory is not None and memory.held.get(str(first), 0) >= 4_000_000,
            f"the reply says what is held: {memory}",
        )
        reply, out, err = cell(
            "y = torch.ones(3).cuda()\nprint(y.device, x.device, float(x[-1]))", [last]
        )
        moved = last != first
        check(
            out == f"cuda:{last} cuda:{last} 999999.0",
            f"a cell bound to {last}: new and earlier tensors on cuda:{last}: {out}",
        )
        check(("[nbcluster] moved" in err) == moved, f"the cell says whether it moved: {err!r}")
        done = parse_reply(
            EvictReply,
            ask(
                "control",
                EvictRequest.msg_type,
                EvictRequest(devices=[last], reason="check").model_dump(),
            ),
        )
        check(
            isinstance(done, EvictReply) and done.freed_bytes >= 4_000_000,
            f"nbcluster_evict_request frees GPU {last}: {done}",
        )
        reply, out, err = cell("print(x.device, y.device, float(x[-1]), float(y.sum()))", [first])
        check(
            out == f"cuda:{first} cuda:{first} 999999.0 3.0",
            f"after the eviction the next cell finds them on cuda:{first}: {out}",
        )
        check(f"to GPU {first}" in err, f"and says so: {err.strip()!r}")
    finally:
        client.stop_channels()
        process.kill()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=20.0, help="model size in GB (default 20)")
    parser.add_argument("--skip-kernel", action="store_true", help="leave out step 4")
    args = parser.parse_args()
    gpus = discovery()
    first, last = gpus[0].index, gpus[-1].index
    peaks = copy_peak(first)
    import torch

    free, _ = torch.cuda.mem_get_info(first)
    gb = min(args.gb, 0.6 * free / 1e9)
    evict_and_restore(gb, first, last, peaks)
    if not args.skip_kernel:
        replica_kernel(first, last, len(gpus))
    if failures:
        print(f"gpu_check: {len(failures)} check(s) FAILED: " + "; ".join(failures))
        sys.exit(1)
    print("gpu_check: all checks passed")


if __name__ == "__main__":
    main()
