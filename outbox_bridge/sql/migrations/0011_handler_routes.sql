-- The one elected dispatcher also dispatches handlers that only other workers have
-- (issue 20): it sends their tasks by name, to the Celery queue recorded here by the
-- worker that registered the handler (NULL: the default queue).
ALTER TABLE handlers ADD COLUMN queue text;
