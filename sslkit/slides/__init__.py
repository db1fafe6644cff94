"""From slides to slide-level answers.

- ``synthetic``: a small collection of pyramidal TIFF slides with a planted slide-level label
  (``sslkit make-slides``), for running and testing the slide path on a CPU.
- ``extract``, ``tiles``, ``encoders``, ``bags``: per-slide feature bags from any encoder
  (``sslkit extract``), in the layout CLAM and TRIDENT read.
- ``mil``, ``mil_data``, ``mil_model``, ``mil_metrics``, ``heatmaps``, ``mil_report``: attention-MIL
  slide classification on feature bags (``sslkit mil``), cross-validated by patient.
"""
