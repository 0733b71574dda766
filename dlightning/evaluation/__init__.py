"""``dlightning evaluate``: metrics of upscaled clips over a benchmark folder (docs/EVALUATION.md).

- :mod:`.config`: the ``evaluate`` section; :mod:`.protocols`: the named benchmark protocols;
- :mod:`.dataset`: clips of LQ / GT / result folders, paired by name;
- :mod:`.runner`: plan (all checks first), upscale, score;
- :mod:`.report`: CSV, Markdown and W&B tables; :mod:`.table`: the papers' benchmark table.
"""
