"""The ``%control_channel`` magic: let queueserver clients drive this kernel over 0MQ."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ...errors import ControlChannelError
from .args import parse_line, unquote

__all__ = ["RemoteMagics"]


@magics_class
class RemoteMagics(Magics):
    """The remote-control magic; it delegates to the session's RemoteService."""

    def __init__(self, shell: Any, service: Any) -> None:
        super().__init__(shell)
        self.service = service

    @magic_arguments()
    @argument("action", nargs="?", default="status", choices=["start", "stop", "status"],
              metavar="start|stop|status",
              help="start: serve queueserver clients; stop: close the channel; status (default): "
              "address, encryption, counters, the info socket, how a client connects.")
    @argument("address", nargs="?", default=None, metavar="ADDRESS",
              help="0MQ address for start, e.g. tcp://127.0.0.1:60615 (default: "
              "QMagic.zmq_control_address, else the address it last served on, else tcp://127.0.0.1:60615). "
              "Use a loopback address "
              "unless CurveZMQ is on ($QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER).")
    @line_magic
    def control_channel(self, line: str) -> None:
        """Let bluesky-queueserver clients (REManagerAPI, qserver, bluesky-httpserver) drive
        this kernel over 0MQ.

        The kernel answers queueserver's control protocol (status, function_execute,
        script_upload, task_status, task_result, lock/unlock, kernel_interrupt, ...) on a thread
        of its own, so replies come back at once even while a cell runs.  Foreground requests
        run on the kernel's main thread when it is idle and are refused while a cell runs;
        background requests are accepted at any time.

        Client side:

            from bluesky_queueserver_api.zmq import REManagerAPI
            RM = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:60615")
            RM.status()

        Examples:

            %control_channel start
            %control_channel start tcp://127.0.0.1:60700
            %control_channel status
            %control_channel stop
        """
        args = parse_line(self.control_channel, line)
        if args.action != "start" and args.address is not None:
            raise UsageError(f"%control_channel {args.action} takes no address.")
        if args.action == "start":
            server = self.service.server
            was = server.address if server is not None and server.running else None
            try:
                new = self.service.start(unquote(args.address)).address
            except ControlChannelError as exc:
                raise UsageError(str(exc)) from None
            if was is not None and new != was:  # (clients of the old address lose the kernel)
                print(f"Control channel moved from {was}: its clients were disconnected; "
                      f"they connect to {new} now.")
            print(self.service.describe())
        elif args.action == "stop":
            print("Control channel stopped." if self.service.stop() else "Control channel was not running.")
        else:
            print(self.service.describe())
