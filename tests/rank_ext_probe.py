"""A rank extension for tests: answers with what its rank sees, fails on request."""


class Probe:
    def __init__(self, runner, tp, config: bytes) -> None:
        self.tp = tp
        self.config = config.decode()
        self.num_local_kv_heads = runner.kv_cache.shape[3]
        self.closed = False

    def handle(self, payload: bytes) -> bytes:
        if payload == b"boom" and self.tp.rank == self.tp.size - 1:
            raise ValueError(f"boom on rank {self.tp.rank}")
        return f"{self.tp.rank}/{self.tp.size} {self.config} {payload.decode()} heads={self.num_local_kv_heads}".encode()

    def close(self) -> None:
        self.closed = True


def make(runner, tp, config: bytes) -> Probe:
    return Probe(runner, tp, config)
