"""The usage panel's data: CPU time against wall-clock time, now and over the last minutes.

The comparison is the service's own: Parley's CPU time against the wall-clock time of its
chats, and what each costs as hosting bills it. The embedded model's compute is reported
apart: whoever runs a model bills it (a provider by tokens, a machine of one's own by the
hour), however Parley itself is hosted, so it is no part of that comparison.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

router = APIRouter(prefix="/api", tags=["usage"])


class Costs(BaseModel):
    currency: str = "USD"
    price_cpu_second: float = Field(description="Price of a CPU-second, CPU-billed hosting.")
    price_request_second: float = Field(
        description="Price of a second of request time, duration-billed hosting."
    )
    cpu_billed: float = Field(
        description="Parley's CPU time in the window at ``price_cpu_second`` (the model's "
        "is not in it: see ``model_cpu_billed``)."
    )
    duration_billed: float = Field(
        description="The wall-clock time of the window's turns at ``price_request_second``."
    )
    model_cpu_billed: float | None = Field(
        description="The embedded model's CPU time in the window at ``price_cpu_second``: "
        "the model's compute, apart from the comparison (null when a provider is used)."
    )


class BucketOut(BaseModel):
    seconds_ago: float
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float


class UsageOut(BaseModel):
    window_seconds: float
    cpu_time: float = Field(description="CPU seconds of Parley's processes in the window.")
    model_cpu_time: float | None = Field(
        description="CPU seconds of the embedded model's process in the window (null when a "
        "provider is used)."
    )
    wall_clock_time: float = Field(
        description="Turn-seconds in the window: the time each turn ran inside it, turns "
        "still being written included."
    )
    turns: int = Field(description="Turns that finished in the window.")
    costs: Costs
    bucket_seconds: float
    series: list[BucketOut] = Field(description="Per bucket, oldest first, ending now.")


BUCKET_SECONDS = 10.0
BUCKETS = 30


@router.get("/usage", response_model=UsageOut)
async def usage(request: Request) -> UsageOut:
    """The last minute's CPU and wall-clock time, their cost two ways, and five minutes of
    history in ten-second buckets: the whole service's, every process sharing the database."""
    meter = request.app.state.usage
    settings = request.app.state.settings
    now = await meter.service_snapshot()
    price_cpu = settings.price_cpu_second
    return UsageOut(
        window_seconds=now.window_seconds,
        cpu_time=now.cpu_time,
        model_cpu_time=now.model_cpu_time,
        wall_clock_time=now.wall_clock_time,
        turns=now.turns,
        costs=Costs(
            price_cpu_second=price_cpu,
            price_request_second=settings.price_request_second,
            cpu_billed=now.cpu_time * price_cpu,
            duration_billed=now.wall_clock_time * settings.price_request_second,
            model_cpu_billed=(
                None if now.model_cpu_time is None else now.model_cpu_time * price_cpu
            ),
        ),
        bucket_seconds=BUCKET_SECONDS,
        series=[
            BucketOut(
                seconds_ago=b.seconds_ago,
                cpu_time=b.cpu_time,
                model_cpu_time=b.model_cpu_time,
                wall_clock_time=b.wall_clock_time,
            )
            for b in await meter.service_series(BUCKET_SECONDS, BUCKETS)
        ],
    )
