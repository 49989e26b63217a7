"""The model cache as a service of the server: pulls, the catalog of pulled models, the budget."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from tabagent.models.cache import CachedModel, ModelCache
from tabagent.models.pull import Puller, model_paths

log = logging.getLogger(__name__)


@dataclass
class ModelService:
    cache: ModelCache
    puller: Puller
    budget_bytes: int = 0  # 0: no limit
    # one pull per reference at a time: a second request for the same pull waits for the first
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock_for(self, ref: str) -> asyncio.Lock:
        return self.locks.setdefault(ref, asyncio.Lock())

    async def enforce_budget(self, protected: set[str]) -> list[str]:
        if not self.budget_bytes:
            return []
        evicted = await asyncio.to_thread(self.cache.enforce_budget, self.budget_bytes, protected)
        for ref in evicted:
            log.info(
                "evicted %s from the model cache (budget %d MiB)", ref, self.budget_bytes >> 20
            )
        return evicted

    def paths(self, model: CachedModel) -> list[str]:
        return [str(p) for p in model_paths(self.cache, model)]
