"""Closed-loop streaming clients against a `Deployment`, for tests that change the pool under load.

    with StreamingLoad(deployment, tokenizer, PROMPTS, params, clients=4) as load:
        ...                      # resize, kill a group; load.results / load.failures grow meanwhile
    assert load.failures == []

Each client sends the prompts in turn (client k starts at prompt k), one request at a time, and
records (prompt, generated token ids) or the error; leaving the block stops and joins them.
"""

import threading


class StreamingLoad:
    def __init__(self, deployment, tokenizer, prompts: list[str], params, clients: int = 4):
        self.deployment, self.tokenizer, self.prompts, self.params = deployment, tokenizer, prompts, params
        self.results: list[tuple[str, list[int]]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def __enter__(self) -> "StreamingLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _client(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            prompt = self.prompts[i % len(self.prompts)]
            try:
                items = self.deployment.generate(self.tokenizer.encode(prompt), self.params)
                self.results.append((prompt, [t for item in items for t in item["token_ids"]]))
            except Exception as err:  # counted; the tests fail on any
                self.failures.append(f"{prompt!r}: {type(err).__name__}: {err}")
            i += 1
