"""Where tests make ■ land: the lines of a function's body, and a trace hook that raises a
real SIGINT at one of them (taken by whatever handler is in place, as the kernel's ■ is).

Imported by the tests that run in this process, and sent as source into test kernels
(``test_kernel_starts.HELPERS``): it imports nothing but the standard library.
"""

import signal
import sys


def lines_of(func):
    """The line numbers of the body of ``func`` (a function or a code object), in order."""
    code = getattr(func, "__code__", func)
    return sorted({line for _, _, line in code.co_lines() if line and line > code.co_firstlineno})


def sigint_at(code, line, fired):
    """Trace hook: ■ (a real SIGINT) the first time ``line`` of ``code`` runs on this
    thread; ``fired`` gets the line."""
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line and not fired:
            fired.append(line)
            sys.settrace(None)
            signal.raise_signal(signal.SIGINT)
        return local
    return lambda frame, event, arg: local if frame.f_code is code and not fired else None


def interrupted_at(code, line, action):
    """Run ``action()`` with ■ (a real SIGINT) the first time ``line`` of ``code`` runs on
    this thread; True if it fired (the KeyboardInterrupt raised there is caught)."""
    fired = []
    sys.settrace(sigint_at(code, line, fired))
    try:
        action()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return bool(fired)
