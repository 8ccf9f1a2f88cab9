"""Making the voice turn model: data generation (`data`) and diffusion training (`train`).

    python -m dllm.training.data --out data/ --seed 0
    python -m dllm.training.train --data data/train.jsonl --run runs/voice

Nothing at inference imports this package.
"""
