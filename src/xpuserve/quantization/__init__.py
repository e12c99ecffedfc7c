"""Weight formats below 16 bits: DeepSeek's block FP8 and per-channel INT8 (math only, torch only)."""
