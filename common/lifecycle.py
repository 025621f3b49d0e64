"""Clean shutdown on SIGINT/SIGTERM, the same way for every long-running role.

The handler only sets `stopping`; each role's loop notices it between iterations and then does
its own orderly exit (checkpoint, tell the broker, close sockets).
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("collafuse")


class Stoppable:
    stopping: bool = False

    def install_signal_handlers(self) -> None:
        def stop(signum, _frame) -> None:
            log.info("%s: signal %s, stopping after this iteration", type(self).__name__, signum)
            self.stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
