// A fast local RFC 8030 push service for Lockstep's benchmark (W6), written
// apart from the worker (Go's standard library only, nothing shared with the
// Rust code) and from tests/python/push_service.py, whose requests API it
// follows: it makes subscriptions (a P-256 key pair and a 16-byte auth secret
// each), verifies each push request's VAPID JWT (RFC 8292) against the `k=`
// key, decrypts the aes128gcm body (RFC 8291, RFC 8188) with the
// subscription's private key, and records the headers and the arrival time.
//
// Why a second one: the Python service answers a few hundred requests a
// second on this machine, so a burst of 1,000 wake-ups measured the Python
// service's queue, not the worker (bench/ANALYSIS.md).
//
// Usage: push_service [-port 0]; prints `PORT <n>` once listening.
//
//	POST /subscriptions -> {"id","endpoint","p256dh","auth"} (base64url)
//	POST /push/<id>     the push endpoint (what the worker calls): 201, 401, 404 or 400
//	GET  /requests      -> every push request seen, in arrival order
package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

type subscription struct {
	private *ecdh.PrivateKey
	auth    []byte
}

// record has the fields of push_service.py's records that the harness reads.
type record struct {
	Subscription    string  `json:"subscription"`
	Arrived         float64 `json:"arrived"`
	TTL             *string `json:"ttl"`
	Urgency         *string `json:"urgency"`
	Topic           *string `json:"topic"`
	ContentEncoding *string `json:"content_encoding"`
	BodyLen         int     `json:"body_len"`
	CiphertextB64   string  `json:"ciphertext_b64"`
	Payload         *string `json:"payload"`
	Error           *string `json:"error"`
	Status          int     `json:"status"`
	VapidSub        *string `json:"vapid_sub,omitempty"`
}

type service struct {
	origin        string
	mu            sync.Mutex
	subscriptions map[string]subscription
	requests      []record
}

var b64u = base64.RawURLEncoding

func unb64u(text string) ([]byte, error) {
	return b64u.DecodeString(strings.TrimRight(text, "="))
}

func header(r *http.Request, name string) *string {
	if value, ok := r.Header[http.CanonicalHeaderKey(name)]; ok && len(value) > 0 {
		return &value[0]
	}
	return nil
}

func answer(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func (s *service) subscribe(w http.ResponseWriter) {
	private, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		answer(w, 500, map[string]string{"error": err.Error()})
		return
	}
	auth := make([]byte, 16)
	idBytes := make([]byte, 9)
	_, _ = rand.Read(auth)
	_, _ = rand.Read(idBytes)
	id := b64u.EncodeToString(idBytes)
	s.mu.Lock()
	s.subscriptions[id] = subscription{private: private, auth: auth}
	s.mu.Unlock()
	answer(w, 200, map[string]string{
		"id":       id,
		"endpoint": s.origin + "/push/" + id,
		"p256dh":   b64u.EncodeToString(private.PublicKey().Bytes()),
		"auth":     b64u.EncodeToString(auth),
	})
}

// verifyVapid checks `vapid t=<jwt>, k=<key>` (RFC 8292) and returns the `sub` claim.
func (s *service) verifyVapid(authorization string) (string, error) {
	if !strings.HasPrefix(authorization, "vapid ") {
		return "", errors.New("no vapid authorization")
	}
	params := map[string]string{}
	for _, part := range strings.Split(authorization[len("vapid "):], ",") {
		key, value, _ := strings.Cut(strings.TrimSpace(part), "=")
		params[key] = value
	}
	token, k := params["t"], params["k"]
	if token == "" || k == "" {
		return "", errors.New("vapid without t= or k=")
	}
	keyBytes, err := unb64u(k)
	if err != nil {
		return "", fmt.Errorf("malformed vapid key: %w", err)
	}
	// ecdh checks that the point is on the curve; ecdsa takes its coordinates.
	if _, err := ecdh.P256().NewPublicKey(keyBytes); err != nil || len(keyBytes) != 65 {
		return "", errors.New("malformed vapid key: not an uncompressed P-256 point")
	}
	public := &ecdsa.PublicKey{
		Curve: elliptic.P256(),
		X:     new(big.Int).SetBytes(keyBytes[1:33]),
		Y:     new(big.Int).SetBytes(keyBytes[33:]),
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", errors.New("malformed vapid: not a JWS")
	}
	var jose struct {
		Alg string `json:"alg"`
	}
	if raw, err := unb64u(parts[0]); err != nil || json.Unmarshal(raw, &jose) != nil {
		return "", errors.New("malformed vapid header")
	}
	if jose.Alg != "ES256" {
		return "", fmt.Errorf("alg %s", jose.Alg)
	}
	signature, err := unb64u(parts[2])
	if err != nil || len(signature) != 64 {
		return "", errors.New("signature is not r||s")
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	r, sig := new(big.Int).SetBytes(signature[:32]), new(big.Int).SetBytes(signature[32:])
	if !ecdsa.Verify(public, digest[:], r, sig) {
		return "", errors.New("bad vapid signature")
	}
	var claims struct {
		Aud string `json:"aud"`
		Exp *int64 `json:"exp"`
		Sub string `json:"sub"`
	}
	if raw, err := unb64u(parts[1]); err != nil || json.Unmarshal(raw, &claims) != nil {
		return "", errors.New("malformed vapid claims")
	}
	now := time.Now().Unix()
	if claims.Aud != s.origin {
		return "", fmt.Errorf("aud %q != %q", claims.Aud, s.origin)
	}
	if claims.Exp == nil || !(now < *claims.Exp && *claims.Exp <= now+24*3600) {
		return "", errors.New("exp not within 24h")
	}
	if !strings.HasPrefix(claims.Sub, "mailto:") && !strings.HasPrefix(claims.Sub, "https:") {
		return "", fmt.Errorf("sub %q", claims.Sub)
	}
	return claims.Sub, nil
}

// decrypt opens an aes128gcm body (RFC 8188) with the keys of RFC 8291.
func decrypt(body []byte, sub subscription) ([]byte, error) {
	if len(body) < 21 {
		return nil, errors.New("body shorter than its header")
	}
	salt, rs, idlen := body[:16], binary.BigEndian.Uint32(body[16:20]), int(body[20])
	if rs < 18 || len(body) < 21+idlen {
		return nil, errors.New("bad header")
	}
	senderPublic, err := ecdh.P256().NewPublicKey(body[21 : 21+idlen])
	if err != nil {
		return nil, fmt.Errorf("keyid is not a P-256 point: %w", err)
	}
	shared, err := sub.private.ECDH(senderPublic)
	if err != nil {
		return nil, err
	}
	prkKey, err := hkdf.Extract(sha256.New, shared, sub.auth)
	if err != nil {
		return nil, err
	}
	keyInfo := "WebPush: info\x00" + string(sub.private.PublicKey().Bytes()) + string(senderPublic.Bytes())
	ikm, err := hkdf.Expand(sha256.New, prkKey, keyInfo, 32)
	if err != nil {
		return nil, err
	}
	prk, err := hkdf.Extract(sha256.New, ikm, salt)
	if err != nil {
		return nil, err
	}
	cek, err := hkdf.Expand(sha256.New, prk, "Content-Encoding: aes128gcm\x00", 16)
	if err != nil {
		return nil, err
	}
	baseNonce, err := hkdf.Expand(sha256.New, prk, "Content-Encoding: nonce\x00", 12)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(cek)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	var plain []byte
	records := body[21+idlen:]
	for seq := uint64(0); len(records) > 0; seq++ {
		size := min(int(rs), len(records))
		nonce := bytes.Clone(baseNonce)
		tail := binary.BigEndian.Uint64(nonce[4:]) ^ seq
		binary.BigEndian.PutUint64(nonce[4:], tail)
		opened, err := gcm.Open(nil, nonce, records[:size], nil)
		if err != nil {
			return nil, fmt.Errorf("record %d: %w", seq, err)
		}
		records = records[size:]
		end := bytes.LastIndexFunc(opened, func(r rune) bool { return r != 0 })
		if end < 0 {
			return nil, fmt.Errorf("record %d has no padding delimiter", seq)
		}
		last := len(records) == 0
		if (last && opened[end] != 2) || (!last && opened[end] != 1) {
			return nil, fmt.Errorf("record %d: wrong padding delimiter %d", seq, opened[end])
		}
		plain = append(plain, opened[:end]...)
	}
	return plain, nil
}

func (s *service) push(w http.ResponseWriter, r *http.Request, id string, arrived float64) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		answer(w, 400, map[string]string{"error": err.Error()})
		return
	}
	rec := record{
		Subscription:    id,
		Arrived:         arrived,
		TTL:             header(r, "TTL"),
		Urgency:         header(r, "Urgency"),
		Topic:           header(r, "Topic"),
		ContentEncoding: header(r, "Content-Encoding"),
		BodyLen:         len(body),
		CiphertextB64:   b64u.EncodeToString(body),
	}
	fail := func(message string, status int) {
		rec.Error, rec.Status = &message, status
	}
	s.mu.Lock()
	sub, known := s.subscriptions[id]
	s.mu.Unlock()
	vapidSub, vapidErr := s.verifyVapid(r.Header.Get("Authorization"))
	switch {
	case !known:
		fail("unknown subscription", 404)
	case vapidErr != nil:
		fail(vapidErr.Error(), 401)
	default:
		rec.VapidSub = &vapidSub
		rec.Status = 201
		if len(body) > 0 {
			if plain, err := decrypt(body, sub); err != nil {
				fail("cannot decrypt: "+err.Error(), 400)
			} else {
				text := string(plain)
				rec.Payload = &text
			}
		}
	}
	s.mu.Lock()
	s.requests = append(s.requests, rec)
	s.mu.Unlock()
	if rec.Status == 201 {
		answer(w, 201, map[string]string{})
	} else {
		answer(w, rec.Status, map[string]string{"error": *rec.Error})
	}
}

func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	arrived := float64(time.Now().UnixNano()) / 1e9
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/subscriptions":
		s.subscribe(w)
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/push/"):
		s.push(w, r, strings.TrimPrefix(r.URL.Path, "/push/"), arrived)
	case r.Method == http.MethodGet && r.URL.Path == "/requests":
		s.mu.Lock()
		seen := append([]record{}, s.requests...)
		s.mu.Unlock()
		answer(w, 200, seen)
	default:
		answer(w, 404, map[string]string{"error": "no such path"})
	}
}

func main() {
	port := flag.Int("port", 0, "port on 127.0.0.1 (0: any free one)")
	flag.Parse()
	listener, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bound := listener.Addr().(*net.TCPAddr).Port
	s := &service{origin: fmt.Sprintf("http://127.0.0.1:%d", bound), subscriptions: map[string]subscription{}}
	fmt.Printf("PORT %d\n", bound)
	if err := http.Serve(listener, s); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
