"""Fine-tuning the text encoder on behaviour (`llmrec tune-encoder`): `tune` is the pure core (pairs, loss,
loop, save), `ray_tune` the Ray Train adapter. A layer above `embed` and `scorer`: it reads the evaluation's
leave-last-out split and the scorer's target kinds."""
