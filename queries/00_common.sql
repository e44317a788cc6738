-- Helpers shared by the other macro files (loaded first: files load in name order).

CREATE OR REPLACE MACRO whq_known_run(run) AS (
    SELECT CASE WHEN count(*) = 0
        THEN error('no committed run ''' || run || ''' in this warehouse: list the runs with SELECT run_id FROM runs')
        ELSE true END
    FROM runs WHERE runs.run_id = run
);
COMMENT ON MACRO whq_known_run IS 'true if the run is committed; otherwise fails with an error naming the fix. Every analysis macro calls it, so a typo in a run id is an error, not an empty result.';

CREATE OR REPLACE MACRO whq_known_site(run, site_name) AS (
    SELECT CASE
        WHEN NOT whq_known_run(run) THEN false
        WHEN count(*) = 0 THEN error('run ''' || run || ''' has no site ''' || site_name
            || ''': list its sites with SELECT site, layers, reductions FROM sites WHERE run_id = ''' || run || '''')
        ELSE true END
    FROM sites s WHERE s.run_id = run AND s.site = site_name
);
COMMENT ON MACRO whq_known_site IS 'true if the run is committed and captured the site; otherwise fails with an error naming the fix.';
