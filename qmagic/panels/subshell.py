"""Panel clicks while a cell blocks the main thread: route panel comms to a kernel subshell.

While a cell runs, the kernel's main thread handles no other shell message, so a widget
click normally waits for the cell to end.  ipykernel 7.4 decides per comm which shell
thread handles an incoming ``comm_msg``: it asks ``comm._reply_subshell_for(data,
default)`` (new in 7.4).  qmagic creates one kernel subshell of its own (a thread that
runs an event loop of the kernel) and makes its panel comms answer with that subshell's
id, so a Cancel click is handled at once even while the main thread is busy.

Only qmagic's own panel comms are routed; routing is version-gated (every private
attribute used is checked with ``hasattr``).  Without it (ipykernel < 7.4, no kernel, or
``QMagic.panel_cancel_subshell = False``) clicks wait for the cell, and the kernel's ■
(interrupt) button is the way to stop a foreground task.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("qmagic")

__all__ = ["SubshellRouter", "routing_supported", "kernel_of"]


def kernel_of(shell: Any) -> Any:
    """The ipykernel Kernel of ``shell`` (or of this process), or None."""
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        return kernel
    try:
        from ipykernel.kernelbase import Kernel

        return Kernel.instance() if Kernel.initialized() else None
    except Exception:  # noqa: BLE001 - no kernel here
        return None


def routing_supported(kernel: Any) -> bool:
    """True when this kernel can hand qmagic's comm messages to a qmagic subshell."""
    if kernel is None:
        return False
    try:
        import ipykernel
        from ipykernel.comm.comm import BaseComm
    except Exception:  # noqa: BLE001
        return False
    version = getattr(ipykernel, "version_info", (0,))
    if tuple(version[:2]) < (7, 4) or not hasattr(BaseComm, "_reply_subshell_for"):
        return False
    if not getattr(kernel, "_supports_kernel_subshells", False):
        return False
    channel = getattr(kernel, "shell_channel_thread", None)
    manager = getattr(channel, "_manager", None)
    return (
        manager is not None
        and hasattr(channel, "io_loop")
        and hasattr(manager, "_create_subshell")
        and hasattr(manager, "_delete_subshell")
    )


class SubshellRouter:
    """Owns one kernel subshell and points widget comms at it.

    ``start()`` creates the subshell (in the kernel's shell-channel thread, as a client's
    ``create_subshell_request`` would); ``route(widget)`` makes that widget's incoming
    messages run there; ``stop()`` deletes the subshell and its thread.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.subshell_id: str | None = None
        self._lock = threading.Lock()
        self._failed = False
        self._creating: threading.Event | None = None

    @classmethod
    def for_shell(cls, shell: Any) -> SubshellRouter | None:
        """A router for ``shell``'s kernel, or None when routing is not supported."""
        kernel = kernel_of(shell)
        return cls(kernel) if routing_supported(kernel) else None

    def _in_channel_thread(self, fn: Any, timeout: float) -> Any:
        """Run ``fn()`` in the kernel's shell-channel thread and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                box["error"] = exc
            finally:
                done.set()

        channel = self.kernel.shell_channel_thread
        channel.io_loop.add_callback(call)
        if not done.wait(timeout):
            raise TimeoutError(f"the kernel's shell channel did not answer within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def start(self, timeout: float = 30.0) -> bool:
        """Create the subshell once (in the shell-channel thread); True once it exists.

        The creation is not abandoned when ``timeout`` passes (a loaded kernel may take
        long): routed comms use the subshell from the moment it exists.
        """
        with self._lock:
            if self.subshell_id is not None:
                return True
            if self._failed:
                return False
            if self._creating is None:
                self._creating = threading.Event()
                manager = self.kernel.shell_channel_thread._manager
                creating = self._creating

                def create() -> None:
                    try:
                        self.subshell_id = manager._create_subshell()
                    except BaseException as exc:  # noqa: BLE001 - fall back to main-shell clicks
                        self._failed = True
                        log.warning(
                            "qmagic: could not create a kernel subshell for panel clicks (%s); "
                            "Cancel buttons will wait while a cell runs, use the kernel's "
                            "interrupt (■) instead.", exc)
                    finally:
                        creating.set()

                self.kernel.shell_channel_thread.io_loop.add_callback(create)
            creating = self._creating
        creating.wait(timeout)
        return self.subshell_id is not None

    def _route(self, data: Any, default: Any) -> Any:
        return self.subshell_id if self.subshell_id is not None else default

    def route(self, widget: Any) -> bool:
        """Handle ``widget``'s incoming comm messages in the subshell; True if routed."""
        comm = getattr(widget, "comm", None)
        if comm is None or not hasattr(comm, "_reply_subshell_for") or self._failed:
            return False
        # Decided for each incoming message: the subshell as soon as it exists, so no click
        # can slip through to the (maybe busy) main shell while it is being created.
        comm._reply_subshell_for = self._route

        def handle_msg(msg: dict, _comm: Any = comm) -> None:
            # Like comm.base_comm.BaseComm.handle_msg but without triggering the shell's
            # pre_execute/post_execute events: this runs beside a cell, not instead of one,
            # and other extensions' hooks (e.g. inline plot flushing) must not fire mid-cell.
            callback = _comm._msg_callback
            if callback is not None:
                callback(msg)

        comm.handle_msg = handle_msg
        return self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Delete the subshell (its thread ends); routed comms fall back to the main shell."""
        creating = self._creating
        if creating is not None:  # a creation under way must finish first, or it would leak
            creating.wait(timeout)
        with self._lock:
            subshell_id, self.subshell_id = self.subshell_id, None
        if subshell_id is None:
            return
        manager = getattr(self.kernel.shell_channel_thread, "_manager", None)
        if manager is None:
            return
        try:
            self._in_channel_thread(lambda: manager._delete_subshell(subshell_id), timeout)
        except Exception as exc:  # noqa: BLE001 - the kernel may be shutting down
            log.warning("qmagic: could not delete the panel subshell %s: %s", subshell_id, exc)
