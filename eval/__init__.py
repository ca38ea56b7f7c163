"""densevid evaluation: DAVIS J&F, label propagation, clustering mIoU, kNN / linear probes, object
discovery and pictures. Imports only base dependencies; never imports ``train``."""
