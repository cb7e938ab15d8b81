"""The functional cores, one module per strategy (named after it), usable without Lightning's Trainer."""
