-- Why a run stopped early: 'SIGINT', 'SIGTERM' or 'cancelled' (NULL for a run that was not interrupted).
ALTER TABLE runs ADD COLUMN interrupted TEXT;
