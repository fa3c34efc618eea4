"""Trainer adapters: glue between RL trainers and the hero-rewards service.

- :mod:`hero_client.adapters.trl` — ``HeroRewardFunction``, a reward function for
  ``trl.GRPOTrainer(reward_funcs=...)``.
- :mod:`hero_client.adapters.verl` — ``compute_score`` (verl's reward loop, one sample a call,
  groups assembled by the service) and ``compute_score_batch`` (verl's ``BatchRewardManager``).
- :mod:`hero_client.adapters.openrlhf` — the ``--reward.remote_url`` endpoint helpers and a
  ``reward_func`` for OpenRLHF's Python-file reward hook.

Each module imports only the client (httpx, pydantic), never the trainer, so importing an
adapter costs nothing and works without the trainer installed. See docs/trainers.md.
"""
