-- Rendered by vroom-init from the postgres appliance's config and run by
-- apply.sh as postgres. It holds passwords, so nothing echoes it: errors are
-- terse and the server logs no statement text. check.sh has made sure every
-- name is a plain identifier; literals are quoted all the same.
\set ON_ERROR_STOP 1
\set VERBOSITY terse
SET log_min_error_statement = panic;
SET log_statement = 'none';
{% for u in users %}
{% set p = u | split(":", 1) %}
{% set name = "'" ~ (p[0] | replace("'", "''")) ~ "'" %}
{% set password = "'" ~ ((p[1] if p | length > 1 else "") | replace("'", "''")) ~ "'" %}
SELECT format('CREATE ROLE %I', {{ name }}) WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {{ name }})
\gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER PASSWORD %L', {{ name }}, {{ password }})
\gexec
SELECT format('COMMENT ON ROLE %I IS %L', {{ name }}, 'vroom: managed')
\gexec
{% endfor %}
-- Users removed from the config lose their login (what they own stays).
SELECT format('ALTER ROLE %I WITH NOLOGIN PASSWORD NULL', r.rolname)
  FROM pg_roles r JOIN pg_shdescription d
    ON d.objoid = r.oid AND d.classoid = 'pg_authid'::regclass
 WHERE d.description = 'vroom: managed' AND r.rolcanlogin
   AND NOT r.rolname = ANY (ARRAY[{% for u in users %}'{{ (u | split(":", 1))[0] | replace("'", "''") }}'{% if not loop.last %}, {% endif %}{% endfor %}]::text[])
\gexec
{% for d in databases %}
{% set p = d | split(":", 1) %}
{% set name = "'" ~ (p[0] | replace("'", "''")) ~ "'" %}
{% set owner = "'" ~ ((p[1] if p | length > 1 else "postgres") | replace("'", "''")) ~ "'" %}
SELECT format('CREATE DATABASE %I OWNER %I', {{ name }}, {{ owner }}) WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {{ name }})
\gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', {{ name }}, {{ owner }})
\gexec
{% endfor %}
