-- The SQLite job table as the migrations build it. Generated: python -m orchestrator.store.fresh
-- (after adding a migration); do not edit by hand. store/fresh.py says how it is used.
-- revision: 0007

CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

CREATE TABLE send_log (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	worker VARCHAR(200) NOT NULL, 
	done_at DATETIME, 
	lease_expires_at DATETIME, 
	CONSTRAINT pk_send_log PRIMARY KEY (id), 
	CONSTRAINT fk_send_log_run_id_runs FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);

CREATE INDEX ix_send_log_run_at ON send_log (run_id, at);

CREATE TABLE workers (
	id VARCHAR(200) NOT NULL, 
	run_id INTEGER NOT NULL, 
	role VARCHAR(10) NOT NULL, 
	host VARCHAR(200) NOT NULL, 
	pid INTEGER NOT NULL, 
	started_at DATETIME NOT NULL, 
	heartbeat_at DATETIME NOT NULL, 
	lease_expires_at DATETIME NOT NULL, 
	left_at DATETIME, 
	claimed INTEGER NOT NULL, 
	CONSTRAINT pk_workers PRIMARY KEY (id), 
	CONSTRAINT fk_workers_run_id_runs FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);

CREATE INDEX ix_workers_run_role ON workers (run_id, role);

CREATE TABLE attempts (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	number INTEGER NOT NULL, 
	worker VARCHAR(200), 
	sent_at DATETIME NOT NULL, 
	answered_at DATETIME, 
	http_status INTEGER, 
	error_code VARCHAR(64), 
	error_msg TEXT, 
	request_id VARCHAR(128), 
	outcome VARCHAR(20) NOT NULL, 
	rule VARCHAR(200), 
	transport VARCHAR(20), cloud_offset_s FLOAT, 
	CONSTRAINT pk_attempts PRIMARY KEY (id), 
	CONSTRAINT fk_attempts_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE, 
	CONSTRAINT uq_attempts_job_id_number UNIQUE (job_id, number)
);

CREATE INDEX ix_attempts_job_id ON attempts (job_id);

CREATE TABLE workflows (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	attempt_id INTEGER, 
	workflow_id VARCHAR(128), 
	instance_id VARCHAR(64), 
	state VARCHAR(20) NOT NULL, 
	error_message TEXT, 
	source VARCHAR(20) NOT NULL, 
	created_at DATETIME NOT NULL, 
	job_status VARCHAR(20), 
	progress VARCHAR(16), 
	fail_reason TEXT, 
	checked_at DATETIME, 
	ended_at DATETIME, 
	CONSTRAINT pk_workflows PRIMARY KEY (id), 
	CONSTRAINT fk_workflows_attempt_id_attempts FOREIGN KEY(attempt_id) REFERENCES attempts (id) ON DELETE CASCADE, 
	CONSTRAINT fk_workflows_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE
);

CREATE INDEX ix_workflows_job_id ON workflows (job_id);

CREATE INDEX ix_workflows_workflow_id ON workflows (workflow_id);

CREATE TABLE "jobs" (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	project_id VARCHAR(64) NOT NULL, 
	instance_id VARCHAR(64) NOT NULL, 
	proxy_id VARCHAR(64) NOT NULL, 
	name VARCHAR(128), 
	region VARCHAR(64), 
	endpoint TEXT NOT NULL, 
	x_language VARCHAR(8) NOT NULL, 
	source_version VARCHAR(32), 
	target_version VARCHAR(32) NOT NULL, 
	inventory_line INTEGER, 
	status VARCHAR(20) NOT NULL, 
	attempt_count INTEGER NOT NULL, 
	read_failures INTEGER DEFAULT '0' NOT NULL, 
	next_attempt_at DATETIME, 
	reason TEXT, 
	hint TEXT, 
	rule VARCHAR(200), 
	current_version VARCHAR(32), 
	latest_version VARCHAR(32), 
	risk JSON, 
	claimed_by VARCHAR(200), 
	lease_expires_at DATETIME, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, intent_deadline DATETIME, wave INTEGER DEFAULT '1' NOT NULL, counts_failure BOOLEAN DEFAULT '0' NOT NULL, 
	CONSTRAINT pk_jobs PRIMARY KEY (id), 
	CONSTRAINT fk_jobs_run_id_runs FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE, 
	CONSTRAINT uq_jobs_run_id_project_id_instance_id_proxy_id UNIQUE (run_id, project_id, instance_id, proxy_id), 
	CONSTRAINT ck_jobs_status CHECK (status IN ('pending', 'in_flight', 'unknown', 'retry_wait', 'accepted', 'succeeded', 'skipped', 'flagged', 'failed'))
);

CREATE INDEX ix_jobs_run_status_due ON jobs (run_id, status, next_attempt_at);

CREATE INDEX ix_jobs_run_instance ON jobs (run_id, instance_id);

CREATE TABLE "runs" (
	id INTEGER NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	inventory_path TEXT NOT NULL, 
	inventory_sha256 VARCHAR(64) NOT NULL, 
	status VARCHAR(20) NOT NULL, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	options JSON NOT NULL, 
	stop_reason TEXT, wave_open INTEGER DEFAULT '1' NOT NULL, failures_acked INTEGER DEFAULT '0' NOT NULL, 
	CONSTRAINT pk_runs PRIMARY KEY (id), 
	CONSTRAINT ck_runs_status CHECK (status IN ('created', 'running', 'stopped', 'paused', 'halted', 'finished'))
);

CREATE INDEX ix_runs_status ON runs (status);

CREATE INDEX ix_jobs_proxy ON jobs (project_id, instance_id, proxy_id);

CREATE INDEX ix_jobs_run_status_wave ON jobs (run_id, status, wave, id);

CREATE TABLE events (
	id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	run_id INTEGER NOT NULL, 
	job_id INTEGER, 
	kind VARCHAR(20) NOT NULL, 
	from_status VARCHAR(20), 
	to_status VARCHAR(20), 
	rule VARCHAR(200), 
	reason TEXT, 
	os_user VARCHAR(64), 
	host VARCHAR(200), 
	pid INTEGER, 
	detail JSON, 
	CONSTRAINT pk_events PRIMARY KEY (id), 
	CONSTRAINT fk_events_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE, 
	CONSTRAINT fk_events_run_id_runs FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);

CREATE INDEX ix_events_run_at ON events (run_id, at);

CREATE INDEX ix_events_job ON events (job_id);

CREATE VIEW v_jobs AS
SELECT x.*, ROUND((julianday(x.workflow_ended_at) - julianday(x.first_sent_at)) * 86400.0, 3) AS duration_s
  FROM (
SELECT j.run_id, r.name AS run_name, j.id AS job_id, j.project_id, j.instance_id, j.proxy_id, j.name,
       j.region, j.wave, j.status, j.source_version, j.target_version, j.current_version, j.latest_version,
       j.attempt_count AS attempts, j.reason, REPLACE(j.hint, '{run}', CAST(j.run_id AS TEXT)) AS hint, j.rule,
       j.counts_failure,
       (SELECT MIN(a.sent_at) FROM attempts a WHERE a.job_id = j.id) AS first_sent_at,
       (SELECT MAX(a.sent_at) FROM attempts a WHERE a.job_id = j.id) AS last_sent_at,
       (SELECT MIN(w.created_at) FROM workflows w
         WHERE w.job_id = j.id AND w.state = 'ACCEPT') AS accepted_at,
       (SELECT CASE WHEN COUNT(*) = COUNT(w.ended_at) THEN MAX(w.ended_at) END FROM workflows w
         WHERE w.job_id = j.id AND w.state = 'ACCEPT') AS workflow_ended_at,
       j.created_at, j.updated_at
  FROM jobs j JOIN runs r ON r.id = j.run_id
) x;

CREATE VIEW v_workflows AS
SELECT w.workflow_id, j.run_id, r.name AS run_name, w.job_id, j.project_id, j.instance_id, j.proxy_id,
       j.name AS proxy_name, a.number AS attempt_number, w.source, w.state, w.error_message,
       w.job_status AS final_status, w.progress, w.fail_reason, w.created_at, w.checked_at, w.ended_at,
       ROUND((julianday(w.ended_at) - julianday(w.created_at)) * 86400.0, 3) AS duration_s, w.id AS row_id
  FROM workflows w
  JOIN jobs j ON j.id = w.job_id
  JOIN runs r ON r.id = j.run_id
  LEFT JOIN attempts a ON a.id = w.attempt_id;

CREATE VIEW v_attempts AS
SELECT a.id AS attempt_id, j.run_id, r.name AS run_name, a.job_id, j.project_id, j.instance_id,
       j.proxy_id, j.name AS proxy_name, a.number, a.worker, a.sent_at, a.answered_at,
       ROUND((julianday(a.answered_at) - julianday(a.sent_at)) * 86400.0, 3) AS latency_s, a.http_status, a.error_code, a.error_msg,
       a.request_id, a.transport, a.outcome, a.rule
  FROM attempts a
  JOIN jobs j ON j.id = a.job_id
  JOIN runs r ON r.id = j.run_id;

CREATE VIEW v_flagged AS
SELECT j.run_id, r.name AS run_name, j.id AS job_id, j.project_id, j.instance_id, j.proxy_id, j.name,
       j.status, j.reason, REPLACE(j.hint, '{run}', CAST(j.run_id AS TEXT)) AS hint, j.rule, j.counts_failure,
       j.attempt_count AS attempts, j.current_version, j.target_version, j.updated_at
  FROM jobs j JOIN runs r ON r.id = j.run_id
 WHERE j.status IN ('flagged', 'failed');

CREATE VIEW v_run_timings AS
SELECT r.id AS run_id, r.name, r.status, r.stop_reason, r.created_at, r.started_at, r.finished_at,
       ROUND((julianday(r.finished_at) - julianday(r.started_at)) * 86400.0, 3) AS duration_s,
       COALESCE(jc.jobs, 0) AS jobs,
       COALESCE(jc.pending, 0) AS pending, COALESCE(jc.in_flight, 0) AS in_flight, COALESCE(jc.unknown, 0) AS unknown, COALESCE(jc.retry_wait, 0) AS retry_wait, COALESCE(jc.accepted, 0) AS accepted, COALESCE(jc.succeeded, 0) AS succeeded, COALESCE(jc.skipped, 0) AS skipped, COALESCE(jc.flagged, 0) AS flagged, COALESCE(jc.failed, 0) AS failed,
       COALESCE(ac.calls, 0) AS calls, ac.first_call_at, ac.last_call_at,
       ROUND((julianday(ac.last_call_at) - julianday(ac.first_call_at)) * 86400.0, 3) AS calls_span_s,
       r.wave_open, r.failures_acked
  FROM runs r
  LEFT JOIN (
SELECT run_id, COUNT(*) AS jobs,
       SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END) AS pending,
       SUM(CASE WHEN status = 'in_flight' THEN 1 ELSE 0 END) AS in_flight,
       SUM(CASE WHEN status = 'unknown' THEN 1 ELSE 0 END) AS unknown,
       SUM(CASE WHEN status = 'retry_wait' THEN 1 ELSE 0 END) AS retry_wait,
       SUM(CASE WHEN status = 'accepted' THEN 1 ELSE 0 END) AS accepted,
       SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END) AS succeeded,
       SUM(CASE WHEN status = 'skipped' THEN 1 ELSE 0 END) AS skipped,
       SUM(CASE WHEN status = 'flagged' THEN 1 ELSE 0 END) AS flagged,
       SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed
  FROM jobs GROUP BY run_id
  ) jc ON jc.run_id = r.id
  LEFT JOIN (
SELECT j.run_id, COUNT(*) AS calls, MIN(a.sent_at) AS first_call_at, MAX(a.sent_at) AS last_call_at
  FROM attempts a JOIN jobs j ON j.id = a.job_id GROUP BY j.run_id
  ) ac ON ac.run_id = r.id;

CREATE VIEW v_events AS
SELECT e.id AS event_id, e.at, e.run_id, r.name AS run_name, e.job_id, j.project_id, j.instance_id,
       j.proxy_id, j.name AS proxy_name, e.kind, e.from_status, e.to_status, e.rule, e.reason,
       e.os_user, e.host, e.pid, e.detail
  FROM events e
  JOIN runs r ON r.id = e.run_id
  LEFT JOIN jobs j ON j.id = e.job_id;

CREATE INDEX ix_send_log_held ON send_log (run_id, lease_expires_at) WHERE done_at IS NULL;

