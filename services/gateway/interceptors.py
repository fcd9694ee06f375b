"""The names the gateway's policy wrappers (auth, rate limits) share, from the one wrapping
mechanism of services/common/interceptors.py."""

from __future__ import annotations

# Re-exported: the gateway's policy modules import these from here.
from services.common.interceptors import BehaviorWrapper as BehaviorWrapper
from services.common.interceptors import Context as Context
from services.common.interceptors import StreamBehavior as StreamBehavior
from services.common.interceptors import UnaryBehavior as UnaryBehavior
