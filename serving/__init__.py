"""Serving on Ray Serve: the jobs API, the job store and file storage, the dispatcher and the generator replicas."""
