//! Debian services (redis-server, nginx) run by the tests, and the clients that talk to them.
