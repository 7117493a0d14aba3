"""``llmatch train``: the LLM2Vec recipe (MNTP, SimCSE) and supervised contrastive fine-tuning on labelled pairs."""
