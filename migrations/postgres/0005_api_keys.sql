-- API keys grow what issue-grade key management needs: the subject a key speaks for (an
-- agent's id, say), its scopes, when it was last used, and the key that replaced it in a
-- rotation. During a rotation's grace period the old key keeps working until its
-- expires_at_ms, which the rotation sets to the end of the grace period.
ALTER TABLE api_keys ADD COLUMN subject TEXT;
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT '*';
ALTER TABLE api_keys ADD COLUMN last_used_at_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN replaced_by UUID;
ALTER TABLE api_keys ADD COLUMN replaces UUID;

CREATE INDEX api_keys_tenant ON api_keys (tenant, id);
