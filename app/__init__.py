"""The example blog service (users → posts → comments) whose schema migrate-job migrates."""
