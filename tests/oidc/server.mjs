// A test identity provider that looks like Keycloak to Bastion: oidc-provider (OpenID Certified) behind a small
// http wrapper that mounts it under /realms/<realm>, with Keycloak's endpoint paths, RS256 JWT access tokens
// carrying `aud`, `realm_access.roles`, `resource_access`, `preferred_username`, `azp` and `bastion_tenant`,
// the realm document (`GET /realms/<realm>` with `public_key`), a login page, and a password grant.
//
// Usage: node server.mjs CONFIG.json — prints `READY {"port": N}` once listening on 127.0.0.1.
// POST /__test/rotate {"jwk": {...}} swaps in a new signing key (as a Keycloak key rotation would); loopback only.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const REALM = config.realm || 'bastion';
const PREFIX = `/realms/${REALM}`;
const RESOURCE = 'urn:bastion:admin-api';
const RESOURCE_SCOPE = 'openid profile email';
const users = config.users || {};
let provider;
let server;

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function resourceServerInfo() {
  return {
    scope: RESOURCE_SCOPE,
    audience: config.audience,
    accessTokenTTL: config.access_token_ttl || 300,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

function tokenClaims(accountId, clientId) {
  const user = users[accountId];
  if (!user) return {};
  const claims = {
    preferred_username: accountId,
    azp: clientId,
    realm_access: { roles: user.roles || [] },
    resource_access: Object.fromEntries(
      Object.entries(user.client_roles || {}).map(([client, roles]) => [client, { roles }]),
    ),
  };
  if (user.tenant) claims.bastion_tenant = user.tenant;
  return claims;
}

function buildProvider(jwk, port) {
  const issuer = `http://127.0.0.1:${port}${PREFIX}`;
  const p = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    pkce: { required: () => true },
    ttl: { AccessToken: config.access_token_ttl || 300, IdToken: 3600, Session: 3600, Grant: 3600 },
    routes: {
      authorization: '/protocol/openid-connect/auth',
      token: '/protocol/openid-connect/token',
      jwks: '/protocol/openid-connect/certs',
      userinfo: '/protocol/openid-connect/userinfo',
      introspection: '/protocol/openid-connect/token/introspect',
      revocation: '/protocol/openid-connect/revoke',
      end_session: '/protocol/openid-connect/logout',
    },
    claims: { openid: ['sub'], profile: ['preferred_username', 'name'], email: ['email'] },
    features: {
      devInteractions: { enabled: false },
      introspection: { enabled: true },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          if (resource !== RESOURCE) throw new errors.InvalidTarget();
          return resourceServerInfo();
        },
      },
    },
    interactions: { url: (ctx, interaction) => `${PREFIX}/interaction/${interaction.uid}` },
    findAccount: (ctx, id) =>
      users[id] ? { accountId: id, claims: () => ({ sub: id, preferred_username: id, name: id }) } : undefined,
    extraTokenClaims: (ctx, token) => tokenClaims(token.accountId, token.clientId),
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) {
        const found = await ctx.oidc.provider.Grant.find(grantId);
        if (found) return found;
      }
      if (!ctx.oidc.session.accountId) return undefined;
      // First-party clients: consent is implied, as in a Keycloak realm with consent turned off.
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope(RESOURCE_SCOPE);
      grant.addResourceScope(RESOURCE, RESOURCE_SCOPE);
      await grant.save();
      return grant;
    },
  });
  p.registerGrantType('password', passwordGrant, ['username', 'password', 'scope']);
  return p;
}

// Keycloak's "direct access grant", which oidc-provider lacks: for API tests that need a token without a browser.
async function passwordGrant(ctx) {
  const { username, password } = ctx.oidc.params;
  const user = users[username];
  if (!user || user.password !== password) throw new errors.InvalidGrant('invalid user credentials');
  const { client } = ctx.oidc;
  const grant = new provider.Grant({ clientId: client.clientId, accountId: username });
  grant.addOIDCScope(RESOURCE_SCOPE);
  grant.addResourceScope(RESOURCE, RESOURCE_SCOPE);
  const grantId = await grant.save();
  const token = new provider.AccessToken({
    accountId: username,
    client,
    grantId,
    gty: 'password',
    scope: RESOURCE_SCOPE,
  });
  token.resourceServer = new provider.ResourceServer(RESOURCE, resourceServerInfo());
  const value = await token.save();
  ctx.body = { access_token: value, expires_in: token.expiration, token_type: 'Bearer', scope: RESOURCE_SCOPE };
}

function publicKeyB64(jwk) {
  const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
  return key.export({ type: 'spki', format: 'der' }).toString('base64');
}

function loginPage(uid, error) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in to ${esc(REALM)}</title></head>
<body><main><h1>Sign in to ${esc(REALM)}</h1>${error ? `<p role="alert" id="error">${esc(error)}</p>` : ''}
<form method="post" action="${PREFIX}/interaction/${esc(uid)}/login">
<label for="username">Username</label> <input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label> <input id="password" name="password" type="password" required>
<button type="submit" id="kc-login">Sign In</button></form></main></body></html>`;
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

async function interaction(req, res, path) {
  const m = path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!m) return send(res, 404, 'text/plain', 'not found');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== m[1]) return send(res, 400, 'text/plain', 'interaction mismatch');
  if (!m[2]) return send(res, 200, 'text/html; charset=utf-8', loginPage(details.uid));
  if (req.method !== 'POST') return send(res, 405, 'text/plain', 'method not allowed');
  const form = new URLSearchParams(await readBody(req));
  const username = form.get('username') || '';
  const user = users[username];
  if (!user || user.password !== form.get('password')) {
    return send(res, 200, 'text/html; charset=utf-8', loginPage(details.uid, 'Invalid username or password.'));
  }
  return provider.interactionFinished(req, res, { login: { accountId: username } }, { mergeWithLastSubmission: false });
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname === '/__test/rotate' && req.method === 'POST') {
    const { jwk } = JSON.parse(await readBody(req));
    provider = buildProvider(jwk, server.address().port);
    config.jwk = jwk;
    return send(res, 200, 'application/json', JSON.stringify({ kid: jwk.kid }));
  }
  if (url.pathname === PREFIX && req.method === 'GET') {
    return send(res, 200, 'application/json', JSON.stringify({
      realm: REALM,
      public_key: publicKeyB64(config.jwk),
      'token-service': `http://127.0.0.1:${server.address().port}${PREFIX}/protocol/openid-connect`,
      'account-service': `http://127.0.0.1:${server.address().port}${PREFIX}/account`,
      'tokens-not-before': 0,
    }));
  }
  if (!url.pathname.startsWith(`${PREFIX}/`)) return send(res, 404, 'text/plain', 'not found');
  const rest = url.pathname.slice(PREFIX.length);
  if (rest.startsWith('/interaction/')) return interaction(req, res, rest);
  // Mount: oidc-provider derives its mount path from originalUrl versus url, as under express.
  req.originalUrl = req.url;
  req.url = req.url.slice(PREFIX.length) || '/';
  return provider.callback()(req, res);
}

server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`oidc test provider: ${err && err.stack}\n`);
    if (!res.headersSent) send(res, 500, 'text/plain', 'server error');
  });
});
server.listen(config.port || 0, '127.0.0.1', () => {
  provider = buildProvider(config.jwk, server.address().port);
  process.stdout.write(`READY ${JSON.stringify({ port: server.address().port })}\n`);
});
