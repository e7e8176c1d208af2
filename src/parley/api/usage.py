"""The usage panel's data: CPU time against wall-clock time, now and over the last minutes."""

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
    cpu_billed: float = Field(description="The window's CPU time (Parley's and the model's).")
    duration_billed: float = Field(description="The window's wall-clock time of turns.")


class BucketOut(BaseModel):
    seconds_ago: float
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float


class UsageOut(BaseModel):
    window_seconds: float
    cpu_time: float
    model_cpu_time: float | None
    wall_clock_time: float
    turns: int
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
    cpu = now.cpu_time + (now.model_cpu_time or 0.0)
    return UsageOut(
        window_seconds=now.window_seconds,
        cpu_time=now.cpu_time,
        model_cpu_time=now.model_cpu_time,
        wall_clock_time=now.wall_clock_time,
        turns=now.turns,
        costs=Costs(
            price_cpu_second=settings.price_cpu_second,
            price_request_second=settings.price_request_second,
            cpu_billed=cpu * settings.price_cpu_second,
            duration_billed=now.wall_clock_time * settings.price_request_second,
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
