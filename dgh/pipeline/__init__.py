"""The DVC stages: each reads ``params.yaml``, runs one step of :mod:`dgh.runs` and writes under ``stages/``.

``dvc.yaml`` runs each stage as its own module (``python -m dgh.pipeline.<stage> <id>``), so a stage imports, and
``dvc.yaml`` lists as deps, only the dgh modules that stage executes (checked by ``tests/test_dvc_deps.py``):

- :mod:`dgh.pipeline.generate`: calibration set ``<set-id>`` (generated sets: ``images.pt`` ...; every set: ``calib.json``);
- :mod:`dgh.pipeline.quantize`: experiment ``<exp-id>`` (``quantized.pt``, ``quantization_report.csv``, ``meta.json``);
- :mod:`dgh.pipeline.evaluate`: ``evaluate_imagenet`` / ``evaluate_coco`` of an experiment, or ``--float`` of a model;
- :mod:`dgh.pipeline.report`: ``reports/`` (:mod:`dgh.report`).

Output paths: :class:`dgh.layout.StageLayout`. Real and noise calibration sets are not materialized (``calib.json``
records what to draw); ``quantize`` draws them with :func:`dgh.data.load_calibration_set`, deterministically from
the set's seed. Generated sets are produced once per model x method and shared by every experiment that uses them.

MLflow (:mod:`dgh.tracking`): ``generate`` logs its loss terms per iteration into a ``generate/<set-id>`` run;
``quantize`` opens the experiment's run (params, tags, the generation loss curves as ``gen.*`` step metrics,
``preview.png``/``meta.json``/``quantized.pt``/``quantization_report.csv`` artifacts); ``evaluate`` resumes it and
logs the metrics. Float baselines get their own ``<model>-float`` runs.
"""
