"""pdserve.engine: the Llama-family runtime every worker runs.

Data flow of one step: ``Scheduler.schedule`` picks tokens under a budget and
allocates KV blocks (``KVCacheManager`` over ``BlockPool``) -> ``prepare_inputs``
flattens them -> the executor runs ``ModelRunner.execute`` on every TP rank ->
``Sampler`` picks tokens -> the engine appends them, checks stops and frees
finished requests' blocks.
"""

from .hashing import block_hashes, hash_block
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "block_hashes", "hash_block"]


def __getattr__(name: str):
    # LLM pulls in torch-heavy modules; keep `import pdserve.engine` light for the router.
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "LLMEngine":
        from .engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
