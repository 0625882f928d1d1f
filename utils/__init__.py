"""Training engine, data pipeline and tools shared by step1/, step2/ and evaluate.py."""
