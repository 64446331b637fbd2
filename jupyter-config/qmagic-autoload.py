# qmagic auto-load: installed as {sys.prefix}/etc/ipython/startup/50-qmagic-autoload.py.
# IPython runs it at the start of every session of this environment.  It loads qmagic in
# Jupyter kernels only (not in a terminal IPython), never raises, and leaves no names in
# the user's namespace.  Set QMAGIC_NO_AUTOLOAD=1 to turn it off.


def _qmagic_autoload():
    import os

    if os.environ.get("QMAGIC_NO_AUTOLOAD", "").strip().lower() not in ("", "0", "false", "no"):
        return
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
            return
        shell.extension_manager.load_extension("qmagic")
    except BaseException as exc:  # noqa: BLE001 - a startup file must never break the kernel
        try:
            import sys

            print(
                f"qmagic: auto-load failed ({type(exc).__name__}: {exc}); the kernel works "
                "without qmagic. Try %load_ext qmagic to see the full error.",
                file=sys.stderr,
            )
        except BaseException:  # noqa: BLE001
            pass


_qmagic_autoload()
del _qmagic_autoload
