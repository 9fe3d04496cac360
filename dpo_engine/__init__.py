"""The training engine every model of the benchmark runs on, at the bottom of the stack: the
optimiser and its minibatches (``optim``), rows batched by length (``batching``) and the packed
GPT-2 forward (``trunk``). It imports nothing of ``reward`` or ``dpo_bench``; both import it."""
