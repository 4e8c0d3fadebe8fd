"""Locust users for ``benchmarks/load.py``: a shop front end calling ``shoprank serve``.

Each simulated user sends single-user requests back to back (no think time) to
``/invocations``: known and unknown users half and half, ``k`` in {1, 10, 50, 200}, with
``recent_items`` (a live session) half the time and ``exclude`` a quarter of the time, and 10%
malformed requests, which count as successes only when answered with a 4xx. A valid request
succeeds when it is answered 200 with exactly ``k`` ranked items.

The ids to use come from the JSON file named by ``SHOPRANK_LOAD_IDS`` (written by load.py):
``{"users": [...], "items": [...]}``. The run stops after ``SHOPRANK_LOAD_MAX`` requests (20,000)
or locust's ``--run-time``, whichever comes first.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, constant, task

IDS = json.loads(open(os.environ["SHOPRANK_LOAD_IDS"]).read())  # noqa: SIM115
KS = (1, 10, 50, 200)
MALFORMED = (
    b'{"dataframe_records": [{"k": 3}]}',
    b'{"dataframe_records": [{"user_id": "u", "k": -1}]}',
    b'{"dataframe_records": [{"user_id": "u", "k": "ten"}]}',
    b'{"dataframe_records": [{"user_id": "u", "k": 1000000}]}',
    b'{"dataframe_records": [{"user_id": "u", "recent_items": "i1"}]}',
    b"this is not json",
    b'{"records": [{"user_id": "u"}]}',
)
HEADERS = {"Content-Type": "application/json"}
MAX_REQUESTS = int(os.environ.get("SHOPRANK_LOAD_MAX", "20000"))
SENT = [0]


class Shop(FastHttpUser):
    """One front-end connection: a request, the answer, the next request."""

    wait_time = constant(0)

    def on_start(self) -> None:
        """Each user gets its own seeded stream of requests."""
        self.rng = random.Random(hash(id(self)) % 2**32)
        self.serial = 0

    @task
    def recommend(self) -> None:
        """One request, 10% of them malformed."""
        SENT[0] += 1
        if SENT[0] > MAX_REQUESTS:
            self.environment.runner.quit()
            return
        rng = self.rng
        if rng.random() < 0.1:
            body = rng.choice(MALFORMED)
            with self.client.post("/invocations", data=body, headers=HEADERS, name="malformed",
                                  catch_response=True) as response:
                if 400 <= response.status_code < 500:
                    response.success()
                else:
                    response.failure(f"malformed request answered {response.status_code}")
            return
        k = rng.choice(KS)
        self.serial += 1
        known = rng.random() < 0.5
        record: dict = {"user_id": rng.choice(IDS["users"]) if known
                        else f"visitor-{id(self)}-{self.serial}", "k": k}
        recent = rng.random() < 0.5
        if recent:
            record["recent_items"] = rng.sample(IDS["items"], rng.randint(1, 5))
        if rng.random() < 0.25:
            record["exclude"] = rng.sample(IDS["items"], 3)
        name = f"k={k}{' +recent' if recent else ''}"
        body = json.dumps({"dataframe_records": [record]})
        with self.client.post("/invocations", data=body, headers=HEADERS, name=name,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"answered {response.status_code}: {response.text[:200]}")
            elif len(response.json()["predictions"]) != k:
                response.failure(f"asked for {k} items, got {len(response.json()['predictions'])}")
            else:
                response.success()
