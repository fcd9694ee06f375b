"""`make run`'s printer when a signal handler writes while the main thread is printing (honcho
prints "SIGTERM received" from its handler): no hang, nothing lost, nothing interleaved."""

from __future__ import annotations

import io
import threading
from datetime import datetime
from pathlib import Path

from honcho.printer import Message

from tools.run import StackPrinter


def line(text: str, name: str = "system") -> Message:
    return Message(type="line", data=text + "\n", time=datetime.now(), name=name, colour=None)


class InterruptedOnce(io.StringIO):
    """An output whose first write is interrupted by a handler that writes to the same printer,
    as a signal arriving in the middle of a print does."""

    def __init__(self) -> None:
        super().__init__()
        self.printer: StackPrinter | None = None
        self.interrupted = False

    def write(self, text: str) -> int:
        if not self.interrupted and self.printer is not None:
            self.interrupted = True
            self.printer.write(line("SIGTERM received"))
        return super().write(text)


def test_a_write_from_a_signal_handler_during_a_write_neither_hangs_nor_is_lost(tmp_path: Path) -> None:
    output = InterruptedOnce()
    printer = StackPrinter(output, tmp_path, ["gateway"])
    output.printer = printer
    done = threading.Event()

    def write() -> None:
        printer.write(line("gateway started (pid=1)"))
        done.set()

    # On the plain Lock this hung forever; a thread keeps the test from hanging with it.
    threading.Thread(target=write, daemon=True).start()
    assert done.wait(timeout=5), "the printer waits on itself when a signal handler writes"
    printer.close()
    lines = [text.split("| ", 1)[-1] for text in output.getvalue().splitlines()]
    assert lines == ["gateway started (pid=1)", "SIGTERM received"], lines
    assert printer.stop_requested and printer.stopping.is_set()
