"""Staging: copy state tensors into one host buffer, allocated once and reused, laid out as safetensors.

The buffer is a memfd (anonymous shared memory) that the writer process maps by file descriptor:
no copy between processes, and nothing left in /dev/shm when a process is killed. On CUDA it is
page-locked in place (cudaHostRegister) so device-to-host copies run asynchronously on a side
stream; where that is not possible on an accelerator (Ascend, or registration refused) a pinned
bounce buffer from the device's own host allocator takes the DMA and a thread copies it over.
On CPU the copy is a plain memcpy in a thread (torch releases the GIL while copying).

Device snapshot (`checkpoint.device_snapshot`): on an accelerator the loop must not change the
parameters before they are copied, and a large state takes longer to cross PCIe than a forward
and backward last. With spare device memory the state is first copied on the device into a flat
snapshot laid out like the host buffer (device-to-device, ~100x faster than PCIe); the loop's
stream waits only for that copy, and the snapshot crosses to the host in one contiguous copy
behind the training. `auto` takes the snapshot where the device keeps enough memory free.

Tensors sit in the buffer sorted by element size, largest first, without gaps, so every slot is
aligned for its dtype and the buffer is exactly the data section of a safetensors file.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import tempfile
import threading

import torch

from feixing.checkpoint.commit import CheckpointError

log = logging.getLogger(__name__)

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
          torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}

# ---- JSON codec for the non-tensor part of a state dict (no pickle anywhere) -------------------


def encode(obj, path: str, tensors: dict):
    """Turn a state dict into JSON-able data; tensors are replaced by {"__tensor__": key}."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[encode(k, f"{path}/key", {}), encode(v, f"{path}/{k}", tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):  # torch.Size too; tuples stay tuples (e.g. AdamW betas)
        return {"__tuple__": [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if type(obj).__module__ == "numpy":
        import numpy as np
        if isinstance(obj, np.ndarray):  # e.g. numpy RNG state: small, exact as a list of ints
            return {"__ndarray__": str(obj.dtype), "shape": list(obj.shape),
                    "data": obj.ravel().tolist()}
        if isinstance(obj, np.generic):
            return obj.item()
    raise CheckpointError(f"cannot checkpoint {path!r}: values of type {type(obj).__name__} are not "
                          "supported (use tensors, numbers, strings, lists, tuples, dicts)")


def decode(obj, tensor):
    """Inverse of `encode`; `tensor(key)` returns the loaded tensor for a tensor marker."""
    if isinstance(obj, list):
        return [decode(v, tensor) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensor(obj["__tensor__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensor) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(decode(k, tensor)): decode(v, tensor) for k, v in obj["__dict__"]}
    if "__ndarray__" in obj:
        import numpy as np
        return np.array(obj["data"], dtype=obj["__ndarray__"]).reshape(obj["shape"])
    return {k: decode(v, tensor) for k, v in obj.items()}


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool) -> None:
    if dsts:  # _foreach_copy_ (in every torch we support, >= 2.6) rejects empty lists
        torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)


# ---- the host buffer -----------------------------------------------------------------------


class HostBuffer:
    """`nbytes` of shared host memory, reachable from the writer process through `fd`."""

    def __init__(self, nbytes: int, device_type: str):
        self.nbytes = nbytes
        size = max(nbytes, 1)
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("feixing-ckpt-staging", 0)
        else:  # non-Linux: an unlinked temporary file behaves the same way
            fd, name = tempfile.mkstemp(prefix="feixing-ckpt-")
            os.unlink(name)
            self.fd = fd
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        except OSError as e:
            os.close(self.fd)
            raise CheckpointError(f"cannot allocate {nbytes / 2**30:.2f} GiB of host staging memory "
                                  f"for checkpoints: {e}") from None
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=size)[:nbytes]
        self.tensor.zero_()  # touch every page now, not during the first save
        self.pinned = False
        self.bounce = None
        if device_type == "cuda" and nbytes:
            rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            self.pinned = int(rc) == 0
            if not self.pinned:
                log.warning("cudaHostRegister of the checkpoint buffer failed (%s); "
                            "using a pinned bounce buffer", rc)
        if device_type not in ("cpu", "meta") and not self.pinned and nbytes:
            # Ascend and others: pinned memory from the device's host allocator, copied over.
            self.bounce = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._device_type = device_type

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        self.tensor = self.bounce = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the OS frees it with the process
            pass
        os.close(self.fd)


class Layout:
    """Where every staged tensor lies in the buffer, and the safetensors header describing it."""

    def __init__(self, items: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        order = sorted(items, key=lambda it: (-it[1].itemsize, it[0]))
        self.slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for key, dtype, shape in order:
            if dtype not in DTYPES:
                raise CheckpointError(f"cannot checkpoint {key!r}: dtype {dtype} is not supported")
            n = dtype.itemsize
            for s in shape:
                n *= s
            self.slots[key] = (off, n, dtype, shape)
            header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        self.nbytes = off
        text = json.dumps(header, separators=(",", ":"))
        self.header = text + " " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
        self.signature = tuple(sorted((k, str(d), s) for k, d, s in items))


def snapshot_fits(nbytes: int, free: int, total: int) -> bool:
    """`device_snapshot = auto`: snapshot only if the device keeps 2 GiB and a tenth of its memory
    free afterwards. Training's own peak lives in blocks the caching allocator already holds, which
    the device does not count as free, so what is free after the first steps is spare."""
    return nbytes + max(2 << 30, total // 10) <= free


class Stager:
    """Copies tensors into the reused buffer, in a thread, so the loop only blocks in `wait()`."""

    def __init__(self, device: torch.device | str, snapshot: str = "off"):
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.snapshot_mode = snapshot  # auto | on | off (see the module docstring)
        self.layout: Layout | None = None
        self.buffer: HostBuffer | None = None
        self.snap: torch.Tensor | None = None  # the device snapshot, laid out like the buffer
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stream = None
        self._snap_event = None
        self._alloc: threading.Thread | None = None
        self._items: list = []  # what `layout` was built from
        self._targets: dict[str, torch.Tensor] = {}
        self._snap_targets: dict[str, torch.Tensor] = {}

    def prepare_async(self, items, then=None) -> None:
        """Allocate (and page in, and pin) the buffer in a thread, ahead of the first save."""
        def work():
            try:
                self.prepare(items)
                if then is not None:
                    then()
            except BaseException as e:  # noqa: BLE001 - the first save allocates again and reports
                log.warning("checkpoint buffer preallocation failed: %s", e)
        self._alloc = threading.Thread(target=work, daemon=True, name="feixing-ckpt-alloc")
        self._alloc.start()

    def prepare(self, items: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bool:
        """Make the buffer fit `items`; returns True when it was (re)allocated."""
        alloc = self._alloc
        if alloc is not None and alloc is not threading.current_thread():
            alloc.join()  # never two allocations at once; the writer it started is ours
            self._alloc = None
        if self.layout is not None and items == self._items:
            return False  # the same tensors as last time (building a Layout costs ~4 ms at 1B)
        layout = Layout(items)
        if self.layout is not None and layout.signature == self.layout.signature:
            self._items = list(items)
            return False
        if self.buffer is not None:
            log.warning("checkpoint state changed shape; reallocating the staging buffer")
            self._free()
        self.buffer = HostBuffer(layout.nbytes, self.device_type)
        self.layout, self._items = layout, list(items)
        # Views made once per layout: the staging thread then runs one torch call per tensor,
        # holding the GIL as little as possible while the loop launches its work.
        self._targets = {k: self.view(k, host=False) for k in layout.slots}
        self._alloc_snapshot()
        return True

    def _alloc_snapshot(self) -> None:
        mode, nbytes = self.snapshot_mode, self.layout.nbytes
        if mode == "off" or nbytes == 0 or (mode == "auto" and self.device_type in ("cpu", "meta")):
            return
        gib = nbytes / 2**30
        if mode == "auto":
            try:
                free, total = torch.get_device_module(self.device_type).mem_get_info(self.device)
            except Exception:  # noqa: BLE001 - a device that cannot say: no snapshot
                return
            if not snapshot_fits(nbytes, free, total):
                log.info("checkpoint: no device snapshot (%.1f GiB of state, %.1f of %.1f GiB free); "
                         "the loop waits for the device-to-host copy instead", gib, free / 2**30, total / 2**30)
                return
        try:
            snap = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if mode == "on":
                raise CheckpointError(f"checkpoint.device_snapshot = 'on' needs {gib:.2f} GiB of "
                                      f"{self.device} memory: {e}") from None
            log.info("checkpoint: no device snapshot: %s", e)
            return
        self.snap = snap
        self._snap_targets = {k: self._slot(snap, k) for k in self.layout.slots}
        log.info("checkpoint: device snapshot on, %.2f GiB of %s memory (checkpoint.device_snapshot "
                 "= 'off' leaves it to training)", gib, self.device)

    def _slot(self, base: torch.Tensor, key: str) -> torch.Tensor:
        off, n, dtype, shape = self.layout.slots[key]
        return base[off: off + n].view(dtype).view(shape)

    def view(self, key: str, host: bool = True) -> torch.Tensor:
        return self._slot(self.buffer.tensor if host or self.buffer.bounce is None else self.buffer.bounce, key)

    def start(self, sources: dict[str, torch.Tensor], then=None, background: bool = True) -> None:
        """Copy `sources` (key -> tensor) into their slots; call `then()` when all bytes are in."""
        assert self._thread is None, "previous staging not waited for"
        self._error = None
        event = None
        if self.device_type not in ("cpu", "meta"):
            mod = torch.get_device_module(self.device_type)
            if self._stream is None:
                self._stream = mod.Stream(self.device)
            event = mod.Event()
            event.record()  # the copies start after everything queued so far (optimizer step)
        if self.snap is not None:
            self._snapshot(sources, event)

        def work():
            try:
                self._copy(sources, event)
                if then is not None:
                    then()
            except BaseException as e:  # noqa: BLE001 - re-raised in wait()
                self._error = e

        if background:
            self._thread = threading.Thread(target=work, daemon=True, name="feixing-ckpt-stage")
            self._thread.start()
        else:
            work()
            self._raise()

    def _snapshot(self, sources: dict[str, torch.Tensor], event) -> None:
        """Queue the device-to-device copy now, so `wait()` can order the optimizer after it."""
        dsts = [self._snap_targets[key] for key in sources]
        srcs = list(sources.values())
        with torch.no_grad():
            if event is None:  # CPU (checkpoint.device_snapshot = 'on', for tests): done here
                _copy_all(dsts, srcs, non_blocking=False)
                return
            mod = torch.get_device_module(self.device_type)
            with mod.stream(self._stream):
                self._stream.wait_event(event)
                _copy_all(dsts, srcs, non_blocking=True)
                self._snap_event = mod.Event()
                self._snap_event.record()

    def _copy(self, sources: dict[str, torch.Tensor], event) -> None:
        # One torch call for all tensors: torch drops the GIL for the whole call, while a Python
        # loop of copy_ calls takes it back between tensors and, with hundreds of tensors, makes
        # the training loop wait for the GIL (up to the 5 ms switch interval each time).
        # From a snapshot it is one contiguous copy: the layouts are the same.
        if self.snap is not None:
            host = self.buffer.tensor if self.buffer.bounce is None else self.buffer.bounce
            dsts, srcs = [host], [self.snap]
        else:
            dsts, srcs = [self._targets[key] for key in sources], list(sources.values())
        with torch.no_grad():
            if event is None:
                _copy_all(dsts, srcs, non_blocking=False)
                return
            mod = torch.get_device_module(self.device_type)
            pinned = self.buffer.pinned or self.buffer.bounce is not None
            with mod.stream(self._stream):
                self._stream.wait_event(event)
                _copy_all(dsts, srcs, non_blocking=pinned)
            self._stream.synchronize()
            if self.buffer.bounce is not None:
                self.buffer.tensor.copy_(self.buffer.bounce)

    def wait(self, everything: bool = True) -> None:
        """Block until the sources may change (before the optimizer changes the parameters).

        With a snapshot, `everything=False` only orders the loop's stream after the snapshot copy
        (on CPU it is already done) and leaves the copy to the host running; `everything=True`
        also waits for that (before the next save, and at the end)."""
        t = self._thread
        if t is not None and (everything or self.snap is None or not t.is_alive()):
            t.join()
            self._thread = self._snap_event = None
        elif self._snap_event is not None:
            torch.get_device_module(self.device_type).current_stream(self.device).wait_event(self._snap_event)
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        self.wait()
        if self._alloc is not None:
            self._alloc.join()
            self._alloc = None
        if self.buffer is not None:
            self._free()

    def _free(self) -> None:
        """Drop the buffer, the snapshot and every view of them."""
        self._targets, self._snap_targets, self.snap = {}, {}, None
        self.buffer.close()
        self.buffer = self.layout = None
